//! The holdfast controller binary; see [`holdfast_controller::run`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = holdfast_controller::args::Args::parse();
    match holdfast_controller::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, for people and for fencing agents' logs. The crate's errors
            // already include their causes in their messages.
            eprintln!("holdfast-controller: error: {err}");
            ExitCode::FAILURE
        }
    }
}
