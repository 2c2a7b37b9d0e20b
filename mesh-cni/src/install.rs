//! Installing the plugin on a node, as the DaemonSet's `mesh-cni install` container
//! does: copy this binary into the host's CNI bin dir and append a `mesh-cni` entry,
//! last, to the pod network's conflist (the first configuration file in the CNI conf
//! dir, the one the runtime uses). Both steps are idempotent, so the installer runs
//! them again every few seconds and repairs a conflist the pod network's own daemon
//! rewrote; on SIGTERM it takes the entry and the binary out again.
//!
//! A single-plugin `.conf` is turned into a `.conflist` holding it, since only a list
//! can chain; removing the entry leaves that list, which the runtime reads the same.

use std::{
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::spec::{PLUGIN_TYPE, PluginConfig};

/// Why an install step failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a CNI configuration: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_owned(), source }
}

/// The conflist with `entry` as its last plugin, or `None` when it already is (and
/// no other `mesh-cni` entry is in the list). Earlier `mesh-cni` entries are removed.
pub fn insert(conflist: &Value, entry: &Value) -> Result<Option<Value>, String> {
    let plugins = conflist["plugins"].as_array().ok_or("no \"plugins\" list")?;
    let ours: Vec<usize> =
        plugins.iter().enumerate().filter(|(_, p)| p["type"] == PLUGIN_TYPE).map(|(i, _)| i).collect();
    if ours == [plugins.len() - 1] && plugins.last() == Some(entry) {
        return Ok(None);
    }
    let mut out = conflist.clone();
    let list = out["plugins"].as_array_mut().expect("checked above");
    list.retain(|p| p["type"] != PLUGIN_TYPE);
    list.push(entry.clone());
    Ok(Some(out))
}

/// The conflist without `mesh-cni` entries, or `None` when it has none.
pub fn remove(conflist: &Value) -> Option<Value> {
    let plugins = conflist["plugins"].as_array()?;
    if !plugins.iter().any(|p| p["type"] == PLUGIN_TYPE) {
        return None;
    }
    let mut out = conflist.clone();
    out["plugins"].as_array_mut()?.retain(|p| p["type"] != PLUGIN_TYPE);
    Some(out)
}

/// The configuration file the runtime uses: the first `.conf`, `.conflist` or
/// `.json` file by name, as libcni orders them.
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(conf_dir)(e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Writes `bytes` to `path` through a temporary file and a rename, so the runtime
/// never reads half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.mesh-tmp"));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// What one install pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub binary_written: bool,
    /// The configuration file found, if any.
    pub config: Option<PathBuf>,
    pub config_written: bool,
}

/// One install pass: the binary, then the entry in the primary configuration.
pub fn install_once(
    source: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    plugin: &PluginConfig,
) -> Result<Pass, InstallError> {
    let mut pass = Pass::default();
    let binary = std::fs::read(source).map_err(io_err(source))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&target).ok().as_deref() != Some(&binary[..]) {
        std::fs::create_dir_all(bin_dir).map_err(io_err(bin_dir))?;
        write_atomic(&target, &binary, 0o755)?;
        pass.binary_written = true;
    }
    let Some(path) = primary_config(conf_dir)? else { return Ok(pass) };
    let text = std::fs::read(&path).map_err(io_err(&path))?;
    let bad = |reason: String| InstallError::BadConfig { path: path.clone(), reason };
    let conf: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let (list_path, list) = if conf.get("plugins").is_some() {
        (path.clone(), conf)
    } else {
        // A single plugin: chain it by making it the first of a list.
        let list = serde_json::json!({
            "cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": [conf],
        });
        (path.with_extension("conflist"), list)
    };
    pass.config = Some(list_path.clone());
    if let Some(new) = insert(&list, &plugin.to_entry()).map_err(bad)? {
        let mut bytes = serde_json::to_vec_pretty(&new).expect("JSON values serialise");
        bytes.push(b'\n');
        write_atomic(&list_path, &bytes, 0o644)?;
        pass.config_written = true;
    }
    if list_path != path {
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    Ok(pass)
}

/// Removes the `mesh-cni` entry from every configuration in `conf_dir` and the
/// binary from `bin_dir`; what is already gone is not an error.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    if let Ok(entries) = std::fs::read_dir(conf_dir) {
        let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        files.sort();
        for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "conflist")) {
            let Ok(text) = std::fs::read(path) else { continue };
            let Ok(conf) = serde_json::from_slice::<Value>(&text) else { continue };
            if let Some(new) = remove(&conf) {
                let mut bytes = serde_json::to_vec_pretty(&new).expect("JSON values serialise");
                bytes.push(b'\n');
                write_atomic(path, &bytes, 0o644)?;
                changed.push(path.clone());
            }
        }
    }
    let target = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&target) {
        Ok(()) => changed.push(target),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&target)(e)),
    }
    Ok(changed)
}

/// Blocks SIGTERM and SIGINT for this (single-threaded) process so [`wait_signal`]
/// can take them synchronously instead of through a handler.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise a local set; pthread_sigmask changes only
    // this thread's mask, and the installer runs on the main thread alone.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for a blocked stop signal; returns it, or `None` on timeout.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: `set` was initialised by block_stop_signals; a null siginfo is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// `mesh-cni install`: a pass every `interval`, logging what changed and what
/// failed (a missing or broken conflist is retried, never fatal), until SIGTERM or
/// SIGINT, which uninstall. With `once`, one pass whose failure is the exit status.
pub fn run(o: &Options, source: &Path) -> Result<(), InstallError> {
    let signals = block_stop_signals();
    let mut last_error = None;
    let mut waiting_logged = false;
    loop {
        match install_once(source, &o.bin_dir, &o.conf_dir, &o.plugin) {
            Ok(pass) => {
                last_error = None;
                if pass.binary_written {
                    eprintln!("mesh-cni install: wrote {}", o.bin_dir.join(PLUGIN_TYPE).display());
                }
                match &pass.config {
                    Some(path) if pass.config_written => {
                        eprintln!("mesh-cni install: chained mesh-cni last in {}", path.display());
                    }
                    Some(_) => {}
                    None if !waiting_logged => {
                        waiting_logged = true;
                        eprintln!(
                            "mesh-cni install: no CNI configuration in {} yet; waiting for the pod network",
                            o.conf_dir.display()
                        );
                    }
                    None => {}
                }
                if o.once {
                    return Ok(());
                }
            }
            Err(e) if o.once => return Err(e),
            Err(e) => {
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    eprintln!("mesh-cni install: {text}; retrying every {:?}", o.interval);
                }
                last_error = Some(text);
            }
        }
        if let Some(sig) = wait_signal(&signals, o.interval) {
            eprintln!("mesh-cni install: signal {sig}: removing mesh-cni from the node");
            for path in uninstall(&o.bin_dir, &o.conf_dir)? {
                eprintln!("mesh-cni install: removed mesh-cni from {}", path.display());
            }
            return Ok(());
        }
    }
}

/// `mesh-cni install` / `uninstall` options.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub plugin: PluginConfig,
    pub interval: Duration,
    /// One pass, then exit (no watching, no removal on exit).
    pub once: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bin_dir: PathBuf::from("/opt/cni/bin"),
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            plugin: PluginConfig::default(),
            interval: Duration::from_secs(5),
            once: false,
        }
    }
}

/// `--help` for the installer; flags are listed one per line, as the deploy test reads them.
pub const USAGE: &str = "\
mesh-cni: the mesh's CNI plugin. Run by the container runtime with CNI_COMMAND set
(ADD, DEL, CHECK, VERSION) and the network configuration on stdin.

Usage: mesh-cni install [OPTIONS]     copy this binary into the CNI bin dir, append mesh-cni
                                     last in the primary conflist, keep both in place, and
                                     remove both on SIGTERM or SIGINT
       mesh-cni uninstall [OPTIONS]  remove the conflist entry and the binary now

Options:
      --bin-dir <DIR>               CNI bin dir (host's, as mounted) [default: /opt/cni/bin]
      --conf-dir <DIR>              CNI conf dir (host's, as mounted) [default: /etc/cni/net.d]
      --agent-socket <PATH>         agentSocket written into the entry: the agent's socket as the
                                    host sees it [default: /run/mesh/agent.sock]
      --timeout-seconds <SECONDS>   timeoutSeconds written into the entry [default: 10]
      --exclude-namespaces <NS,..>  excludeNamespaces written into the entry: pods there are
                                    never handed to the agent
      --interval-seconds <SECONDS>  how often to re-check the binary and conflist [default: 5]
      --once                        install once and exit (install only)
  -h, --help                        print this help
";

/// Parses the arguments after `install` or `uninstall`.
pub fn parse_args(args: &[String]) -> Result<Options, InstallError> {
    let mut o = Options::default();
    let (mut socket, mut timeout, mut exclude) = (None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        if flag == "--once" {
            o.once = true;
            continue;
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| InstallError::Usage(format!("{flag} needs a value")))
        };
        match flag {
            "--bin-dir" => o.bin_dir = PathBuf::from(value()?),
            "--conf-dir" => o.conf_dir = PathBuf::from(value()?),
            "--agent-socket" => socket = Some(Value::from(value()?)),
            "--timeout-seconds" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| InstallError::Usage(format!("--timeout-seconds: {v:?} is not a number")))?;
                timeout = Some(Value::from(secs));
            }
            "--exclude-namespaces" => {
                let v = value()?;
                exclude = Some(Value::from(v.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>()));
            }
            "--interval-seconds" => {
                let v = value()?;
                let secs = v.parse::<u64>().ok().filter(|s| (1..=3600).contains(s)).ok_or_else(|| {
                    InstallError::Usage(format!("--interval-seconds: {v:?} is not 1 to 3600 seconds"))
                })?;
                o.interval = Duration::from_secs(secs);
            }
            other => {
                return Err(InstallError::Usage(format!("unknown option {other} (see mesh-cni --help)")));
            }
        }
    }
    o.plugin = PluginConfig::from_fields(socket, timeout, exclude).map_err(|e| {
        // Name the flag, not the conflist field it fills.
        let msg = e
            .msg
            .replace("network configuration field agentSocket", "--agent-socket")
            .replace("network configuration field timeoutSeconds", "--timeout-seconds")
            .replace("network configuration field excludeNamespaces", "--exclude-namespaces");
        InstallError::Usage(msg)
    })?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry() -> Value {
        PluginConfig::default().to_entry()
    }

    fn flannel() -> Value {
        json!({"cniVersion":"1.0.0","name":"cbr0","plugins":[
            {"type":"flannel","delegate":{"isDefaultGateway":true}},
            {"type":"portmap","capabilities":{"portMappings":true}}]})
    }

    #[test]
    fn insert_appends_last_once_and_remove_restores() {
        let orig = flannel();
        let with = insert(&orig, &entry()).unwrap().expect("changed");
        let types: Vec<&str> =
            with["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["flannel", "portmap", "mesh-cni"]);
        assert_eq!(insert(&with, &entry()).unwrap(), None, "idempotent");
        assert_eq!(remove(&with), Some(orig.clone()));
        assert_eq!(remove(&orig), None);
    }

    #[test]
    fn insert_moves_a_stale_or_misplaced_entry_to_the_end() {
        let mut conf = flannel();
        let mut old = entry();
        old["timeoutSeconds"] = json!(99);
        conf["plugins"].as_array_mut().unwrap().insert(0, old);
        let fixed = insert(&conf, &entry()).unwrap().unwrap();
        let plugins = fixed["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], entry());
        assert!(insert(&json!({"name":"x"}), &entry()).is_err());
    }

    #[test]
    fn install_and_uninstall_on_a_conf_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&conf).unwrap();
        let source = dir.path().join("mesh-cni-src");
        std::fs::write(&source, b"\x7fELF fake").unwrap();
        // No configuration yet: the binary goes in, the config waits for the pod network.
        let pass = install_once(&source, &bin, &conf, &PluginConfig::default()).unwrap();
        assert!(pass.binary_written && pass.config.is_none());
        std::fs::write(conf.join("20-other.conflist"), flannel().to_string()).unwrap();
        std::fs::write(conf.join("10-flannel.conflist"), flannel().to_string()).unwrap();
        let pass = install_once(&source, &bin, &conf, &PluginConfig::default()).unwrap();
        assert_eq!(pass.config.as_deref(), Some(conf.join("10-flannel.conflist").as_path()));
        assert!(pass.config_written && !pass.binary_written);
        let mode = std::fs::metadata(bin.join("mesh-cni")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let again = install_once(&source, &bin, &conf, &PluginConfig::default()).unwrap();
        assert!(!again.config_written && !again.binary_written, "a second pass changes nothing");
        let other: Value =
            serde_json::from_slice(&std::fs::read(conf.join("20-other.conflist")).unwrap()).unwrap();
        assert_eq!(other, flannel(), "only the primary configuration is chained");

        let removed = uninstall(&bin, &conf).unwrap();
        assert_eq!(removed, [conf.join("10-flannel.conflist"), bin.join("mesh-cni")]);
        let back: Value =
            serde_json::from_slice(&std::fs::read(conf.join("10-flannel.conflist")).unwrap()).unwrap();
        assert_eq!(back, flannel());
        assert!(uninstall(&bin, &conf).unwrap().is_empty(), "uninstall is idempotent");
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let dir = tempfile::tempdir().unwrap();
        let single = json!({"cniVersion":"0.4.0","name":"k8s-pod-network","type":"bridge","bridge":"cni0"});
        std::fs::write(dir.path().join("10-bridge.conf"), single.to_string()).unwrap();
        let source = dir.path().join("src");
        std::fs::write(&source, b"bin").unwrap();
        let pass =
            install_once(&source, &dir.path().join("bin"), dir.path(), &PluginConfig::default()).unwrap();
        let list_path = dir.path().join("10-bridge.conflist");
        assert_eq!(pass.config.as_deref(), Some(list_path.as_path()));
        assert!(!dir.path().join("10-bridge.conf").exists());
        let list: Value = serde_json::from_slice(&std::fs::read(&list_path).unwrap()).unwrap();
        assert_eq!((&list["name"], &list["cniVersion"]), (&json!("k8s-pod-network"), &json!("0.4.0")));
        assert_eq!(list["plugins"][0], single);
        assert_eq!(list["plugins"][1]["type"], "mesh-cni");
    }

    #[test]
    fn a_broken_primary_config_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("10-x.conflist"), "{oops").unwrap();
        let source = dir.path().join("src");
        std::fs::write(&source, b"bin").unwrap();
        let e =
            install_once(&source, &dir.path().join("bin"), dir.path(), &PluginConfig::default()).unwrap_err();
        assert!(e.to_string().contains("10-x.conflist: not a CNI configuration"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.path().join("10-x.conflist")).unwrap(), "{oops");
    }

    #[test]
    fn options_are_parsed_and_bad_ones_named() {
        let args: Vec<String> = [
            "--bin-dir",
            "/host/bin",
            "--conf-dir=/host/net.d",
            "--agent-socket",
            "/run/m.sock",
            "--timeout-seconds",
            "3",
            "--exclude-namespaces",
            "kube-system,mesh-system",
            "--once",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let o = parse_args(&args).unwrap();
        assert_eq!(
            (o.bin_dir.to_str(), o.conf_dir.to_str(), o.once),
            (Some("/host/bin"), Some("/host/net.d"), true)
        );
        assert_eq!(o.plugin.agent_socket, PathBuf::from("/run/m.sock"));
        assert_eq!(o.plugin.exclude_namespaces, ["kube-system", "mesh-system"]);
        for (bad, want) in [
            (vec!["--agent-socket", "rel.sock"], "--agent-socket:"),
            (vec!["--timeout-seconds", "x"], "--timeout-seconds:"),
            (vec!["--timeout-seconds", "0"], "--timeout-seconds:"),
            (vec!["--exclude-namespaces", "Bad_NS"], "--exclude-namespaces[0]:"),
            (vec!["--interval-seconds", "0"], "--interval-seconds:"),
            (vec!["--bin-dir"], "--bin-dir needs a value"),
            (vec!["--frobnicate"], "unknown option --frobnicate"),
        ] {
            let args: Vec<String> = bad.iter().map(ToString::to_string).collect();
            let e = parse_args(&args).unwrap_err().to_string();
            assert!(e.starts_with(want), "{bad:?}: {e}");
        }
    }
}
