//! `openuni`: OpenUni text-to-image inference with hand-written CUDA kernels and an f32 CPU
//! reference.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use openuni::exec::{parse_dtype, Device};
use openuni::verify::{run_case, Options};

#[derive(Parser)]
#[command(name = "openuni", version, about = "OpenUni inference engine: CUDA kernels with an f32 CPU reference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run reference case(s) and compare every output with PyTorch's (PASS/FAIL, exit 1 on FAIL).
    Verify {
        /// Case folders (case.json, io.safetensors, model/).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Storage type on the device: f32 or bf16 (the CPU runs f32 only).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Also compare every node's output with the CPU reference (localises a divergence).
        #[arg(long)]
        diff_nodes: bool,
    },
    /// Convert a PyTorch .pth checkpoint (read without running any pickled code) or safetensors
    /// file(s) to one safetensors file with the same tensor names and dtypes.
    Convert {
        /// Input: a torch.save .pth/.pt file, a .safetensors file, index or folder.
        input: PathBuf,
        /// Output .safetensors file.
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Verify { cases, device, dtype, diff_nodes } => {
            let opts = Options { device: Device::parse(&device)?, dtype: parse_dtype(&dtype)?, diff_nodes };
            let mut all_passed = true;
            for case in &cases {
                let report = run_case(case, &opts)?;
                print!("{}", report.render());
                all_passed &= report.passed();
            }
            Ok(all_passed)
        }
        Command::Convert { input, output } => {
            println!("{}", openuni::convert::convert(&input, &output)?);
            Ok(true)
        }
    }
}
