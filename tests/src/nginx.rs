//! A real nginx in a test host, for tests whose point is what a real server makes
//! of what the mesh forwards (paths, headers): one worker, its config, temp files
//! and access log in a directory of the test's, stopped on drop.

use std::{
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use crate::netns::Host;

/// A running nginx; SIGTERM to the master (which stops its workers) on drop.
pub struct Nginx {
    child: Child,
    access_log: PathBuf,
}

impl Nginx {
    /// Starts nginx in `host` on `port` (IPv4 and IPv6) with one server whose body
    /// is `locations` (nginx `location` blocks); files go in `dir`. Returns once it
    /// accepts connections. Each request is logged as `$request_uri $uri $status`.
    pub fn start(host: &Host, dir: &Path, port: u16, locations: &str) -> Result<Self> {
        let conf = dir.join("nginx.conf");
        let access_log = dir.join("nginx-access.log");
        let tmp = dir.display();
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nuser root;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  log_format mesh '$request_uri $uri $status';\n  access_log {log} mesh;\n  \
                 client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n  \
                 uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n  \
                 server {{\n    listen {port}; listen [::]:{port};\n    {locations}\n  }}\n}}\n",
                dir = tmp,
                log = access_log.display(),
            ),
        )?;
        let child = host
            .command("nginx", None)?
            .args(["-c", &conf.display().to_string(), "-e", "stderr"])
            .spawn()
            .context("starting nginx (install the nginx package)")?;
        let nginx = Self { child, access_log };
        let addr = host.v4_addr(port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while host.run_in(move || std::net::TcpStream::connect(addr).is_err())? {
            ensure!(Instant::now() < deadline, "nginx did not listen on {addr} within 10s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// The access log so far: one `$request_uri $uri $status` line per request.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.access_log).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's master stops its workers on TERM; a SIGKILLed master would
        // leave them running in a namespace that is about to go.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
