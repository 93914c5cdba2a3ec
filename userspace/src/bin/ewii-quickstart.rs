//! `ewii-quickstart`: a local Hub, an enrolled Client and a query through it, on embedded
//! defaults in a temporary directory. `--processes`: the same with the `ewii-hub` and
//! `ewii-client` binaries as separate processes.

use std::process::ExitCode;

fn main() -> ExitCode {
    ewii::logging::init("warn", ewii::logging::LogFormat::Text);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ewii-quickstart: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => runtime.block_on(ewii::quickstart::run(&mut out)),
        [flag] if flag == "--processes" => {
            runtime.block_on(ewii::quickstart::run_processes(&mut out))
        }
        _ => {
            eprintln!("usage: ewii-quickstart [--processes]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ewii-quickstart: {}", ewii::logging::causes(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
