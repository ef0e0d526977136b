//! `holdfast-driver`: the node plugin binary. Everything but argument parsing lives in
//! the library (`holdfast_driver::run`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = holdfast_driver::args::Args::parse();
    holdfast_driver::run(args).await?;
    Ok(())
}
