//! gRPC with the real Python client and server (grpcio): a generic echo service
//! (`mesh.test.Echo`: unary `Say`, server-streaming `Count`) that names the server
//! in every reply, and the Python that runs it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// `python ECHO_SCRIPT server PORT NAME` serves `mesh.test.Echo`, printing
/// `{"message": "grpc server ready"}` once it listens; `python ECHO_SCRIPT client
/// HOST:PORT UNARY STREAM` makes UNARY `Say` calls, one `Count` of STREAM and one
/// call of a missing method, and prints what came back as JSON.
pub const ECHO_SCRIPT: &str = r#"
import json, sys
from concurrent import futures
import grpc

if sys.argv[1] == "server":
    port, name = int(sys.argv[2]), sys.argv[3]

    def say(request, context):
        return ("server=%s hello %s" % (name, request.decode())).encode()

    def count(request, context):
        for i in range(int(request.decode())):
            yield ("server=%s message %d" % (name, i)).encode()

    handler = grpc.method_handlers_generic_handler("mesh.test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("[::]:%d" % port)
    server.start()
    print(json.dumps({"message": "grpc server ready"}), flush=True)
    server.wait_for_termination()
else:
    target, unary, stream = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    channel = grpc.insecure_channel(target)
    say = channel.unary_unary("/mesh.test.Echo/Say")
    count = channel.unary_stream("/mesh.test.Echo/Count")
    out = {"unary": [], "stream": []}
    for i in range(unary):
        out["unary"].append(say(("n%d" % i).encode(), timeout=10).decode())
    out["stream"] = [m.decode() for m in count(stream.encode(), timeout=10)]
    try:
        channel.unary_unary("/mesh.test.Echo/Missing")(b"x", timeout=10)
        out["missing"] = "OK"
    except grpc.RpcError as e:
        out["missing"] = e.code().name
    print(json.dumps(out), flush=True)
"#;

/// A Python with grpcio: `MESH_TEST_PYTHON`, or a venv under the target directory
/// created on first use (`python3 -m venv` + `pip install grpcio`). `None` (said
/// loudly) when that fails outside CI; a failure under `CI=true`.
pub fn python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        let has_grpc = |py: &Path| {
            Command::new(py).args(["-c", "import grpc"]).output().is_ok_and(|o| o.status.success())
        };
        if let Some(py) = std::env::var_os("MESH_TEST_PYTHON").map(PathBuf::from) {
            return if has_grpc(&py) { Ok(py) } else { Err(format!("{} cannot import grpc", py.display())) };
        }
        // target/<profile>/deps/<test>-<hash> -> target/
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let venv = exe.ancestors().nth(3).ok_or("no target directory")?.join("grpc-venv");
        let py = venv.join("bin/python");
        if has_grpc(&py) {
            return Ok(py);
        }
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr)))
            }
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "grpcio>=1.60"]))?;
        if has_grpc(&py) { Ok(py) } else { Err("grpcio installed but not importable".into()) }
    });
    match found {
        Ok(py) => Some(py.clone()),
        Err(e) => {
            let msg = format!("the gRPC test needs python3 (with venv and pip) and grpcio: {e}");
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{msg} (CI=true: this test must run)");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}
