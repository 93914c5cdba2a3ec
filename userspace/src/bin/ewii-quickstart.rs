//! `ewii-quickstart`: a local Hub, an enrolled Client and a query through it, on embedded
//! defaults in a temporary directory.

use std::process::ExitCode;

fn main() -> ExitCode {
    ewii::logging::init("warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ewii-quickstart: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    match runtime.block_on(ewii::quickstart::run(&mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ewii-quickstart: {e:#}");
            ExitCode::FAILURE
        }
    }
}
