//! `cargo xtask bench pods`: what serving many pods costs the node agent. On one node
//! (network namespace), N pod sandboxes are added one after another through the real
//! CNI chain (Debian's `bridge` + `host-local`, then `mesh-cni`), as a container
//! runtime adds them, each pod with an identity of its own. For each pod it records
//! how long `mesh-cni`'s ADD took, which is the time from the runtime's call to the
//! pod being served (the plugin returns only once the agent serves the pod), beside
//! the pod network's own plugins in the same chain; then the agent's resident memory
//! empty, with N pods (and their N certificates), and after every pod is deleted.
//! Both interception modes, one run; writes `bench-results/pods.md`.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use mesh_tests::{
    Agent, Control, Lab,
    agent::message,
    pods::{Pod, PodNode, pod_ip},
};

pub struct Options {
    pub pods: usize,
}

/// One mode's figures.
struct Figures {
    mode: &'static str,
    /// `mesh-cni` ADD per pod (ms), in the order the pods were added.
    served_ms: Vec<f64>,
    /// The pod network's plugins (`bridge` with `host-local`) per pod (ms).
    network_ms: Vec<f64>,
    rss_empty_kib: u64,
    /// After the first half of the pods (and their certificates): the base the
    /// per-pod figure is taken from.
    rss_half_kib: u64,
    half: usize,
    rss_full_kib: u64,
    rss_after_del_kib: u64,
    /// RSS after every fifth pod's ADD (certificates may still be on their way).
    rss_series_kib: Vec<u64>,
}

fn registry(pods: usize) -> String {
    let mut r = String::from("services: []\nworkloads:\n");
    for i in 0..pods {
        let ip = pod_ip(u8::try_from(i).expect("at most 240 pods"));
        let _ = writeln!(
            r,
            "  - {{name: pod-{i:03}, namespace: bench, service_account: sa-{i:03}, node: node, addresses: [{ip}]}}"
        );
    }
    r
}

/// The process's resident memory, read by the test crate's reader.
fn rss_kib(pid: u32) -> Result<u64> {
    mesh_tests::process::Memory::of(pid).map(|m| m.rss_kib).context("VmRSS in /proc/PID/status")
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn measure(mode: &'static str, pods: usize) -> Result<Figures> {
    let lab = Lab::new(&["control", "node"])?;
    let dir = tempfile::tempdir()?;
    let reg = dir.path().join("registry.yaml");
    std::fs::write(&reg, registry(pods))?;
    let control = Control::start_with_ca(lab.host("control"), &reg, dir.path(), &["node"], &[])?;
    let opts = control
        .discovery_options(mode, "node")
        .arg("--pod-state")
        .arg(dir.path().join("pods.json").display().to_string());
    let agent =
        Agent::start(lab.host("node"), mesh_tests::AgentOptions { log: Some("info".into()), ..opts })?;
    agent.wait_log("first discovery snapshot", |v| message(v) == "snapshot applied");
    let rss_empty_kib = rss_kib(agent.pid())?;
    let node = PodNode::new(lab.host("node"), &agent.admin_socket)?;

    let (mut served_ms, mut network_ms, mut added): (Vec<f64>, Vec<f64>, Vec<Pod>) =
        (Vec::new(), Vec::new(), Vec::new());
    let half = (pods / 2).max(1);
    let mut rss_half_kib = 0;
    let mut rss_series_kib = Vec::new();
    for i in 0..pods {
        if i == half {
            wait_for_certificates(&agent, half)?;
            rss_half_kib = rss_kib(agent.pid())?;
        }
        let name = format!("pod-{i:03}");
        let (pod, run) = node.add_timed("bench", &name)?;
        let pod = pod.map_err(|run| anyhow::anyhow!("ADD of {name} failed: {run:?}"))?;
        for r in &run.runs {
            let ms = r.elapsed.as_secs_f64() * 1000.0;
            if r.plugin == "mesh-cni" {
                served_ms.push(ms);
            } else {
                network_ms.push(ms);
            }
        }
        added.push(pod);
        if (i + 1) % 5 == 0 {
            rss_series_kib.push(rss_kib(agent.pid())?);
        }
    }
    wait_for_certificates(&agent, pods)?;
    let rss_full_kib = rss_kib(agent.pid())?;
    for pod in added {
        let run = node.remove(pod)?;
        ensure!(run.succeeded(), "DEL failed: {run:?}");
    }
    let rss_after_del_kib = rss_kib(agent.pid())?;
    agent.terminate()?;
    Ok(Figures {
        mode,
        served_ms,
        network_ms,
        rss_empty_kib,
        rss_half_kib,
        half,
        rss_full_kib,
        rss_after_del_kib,
        rss_series_kib,
    })
}

/// Every pod's certificate is requested when it is served: waits until `n` are in.
fn wait_for_certificates(agent: &Agent, n: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let issued = agent.find_all(|v| message(v) == "workload certificate issued").len();
        if issued >= n {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "{issued} of {n} certificates issued after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (namespaces, cgroups, BPF)");
    ensure!((1..=200).contains(&opts.pods), "--pods must be between 1 and 200 (one /24 of pod addresses)");
    crate::setup::system_packages()?;
    println!("[1/2] building release binaries");
    let _bins = crate::release::build_aside(root)?;
    let mut all = Vec::new();
    for mode in ["ebpf", "iptables"] {
        println!("[2/2] {mode}: adding {} pods", opts.pods);
        all.push(measure(mode, opts.pods)?);
    }
    let mut md = String::new();
    let _ = writeln!(md, "# Pods on one node: `cargo xtask bench pods --pods {}`\n", opts.pods);
    let _ = writeln!(
        md,
        "Each pod is added through the real CNI chain (`bridge` + `host-local`, then `mesh-cni`), with \
         an identity of its own. *Served* is `mesh-cni`'s ADD: from the runtime's call until the agent \
         serves the pod (listeners in its namespace, interception on); *pod network* is the `bridge` \
         plugin's ADD in the same chain, for scale. RSS is the agent's VmRSS; the per-pod figure is \
         taken from half of the pods on. In eBPF mode the RSS at start still holds the memory of \
         loading the programs, made on a blocking thread whose allocator arena is returned when \
         that thread retires (10 s idle), which the series below shows.\n"
    );
    let _ = writeln!(
        md,
        "| mode | pods | served p50 / p90 / max (ms) | pod network p50 (ms) | served / pod network | RSS at start | RSS with half | RSS with all pods and certificates | per pod (from half to all) | RSS after every DEL |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for f in &all {
        let net = percentile(&f.network_ms, 0.5);
        let served = percentile(&f.served_ms, 0.5);
        let per_pod =
            f.rss_full_kib.saturating_sub(f.rss_half_kib) as f64 / (opts.pods - f.half).max(1) as f64;
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} / {:.1} / {:.1} | {:.1} | {:.2}x | {:.1} MiB | {:.1} MiB ({}) | {:.1} MiB | {:.0} KiB | {:.1} MiB |",
            f.mode,
            opts.pods,
            served,
            percentile(&f.served_ms, 0.9),
            percentile(&f.served_ms, 1.0),
            net,
            served / net,
            f.rss_empty_kib as f64 / 1024.0,
            f.rss_half_kib as f64 / 1024.0,
            f.half,
            f.rss_full_kib as f64 / 1024.0,
            per_pod,
            f.rss_after_del_kib as f64 / 1024.0,
        );
    }
    let _ = writeln!(md, "\nRSS (MiB) after every fifth pod's ADD:\n");
    for f in &all {
        let series: Vec<String> =
            f.rss_series_kib.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect();
        let _ = writeln!(md, "- {}: {}", f.mode, series.join(", "));
    }
    println!("{md}");
    let out = root.join("bench-results/pods.md");
    std::fs::create_dir_all(out.parent().expect("a parent"))?;
    std::fs::write(&out, md)?;
    println!("written to {}", out.display());
    Ok(())
}
