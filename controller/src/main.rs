//! The holdfast controller binary; see [`holdfast_controller::run`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = holdfast_controller::args::Args::parse();
    match holdfast_controller::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line with every cause, for people and for fencing agents' logs.
            eprintln!("holdfast-controller: error: {:#}", anyhow::Error::from(err));
            ExitCode::FAILURE
        }
    }
}
