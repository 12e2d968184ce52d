//! `skiff`: the command line client. Parses arguments and hands over to [`skiff_client::cli`].
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = skiff_client::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skiff: cannot start the async runtime: {e}");
            std::process::exit(skiff_client::cli::ExitCode::Failure as i32);
        }
    };
    if let Err(e) = runtime.block_on(skiff_client::cli::run(cli)) {
        eprintln!("skiff: {}", e.message);
        std::process::exit(e.code as i32);
    }
}
