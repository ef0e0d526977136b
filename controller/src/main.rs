//! The holdfast controller binary; see [`holdfast_controller::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = holdfast_controller::args::Args::parse();
    holdfast_controller::run(args).await?;
    Ok(())
}
