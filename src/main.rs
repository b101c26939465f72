//! The `pqmig` binary: parse arguments, run the command, map errors to the
//! exit codes of SPEC §8.1. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

/// Fix glibc's mmap threshold. By default it rises each time a large
/// block is freed, after which batch-sized buffers (megabytes) come from
/// the heap and stay there, so peak RSS grows with the length of a job.
/// Fixed at 128 KiB, large buffers are mapped and returned, and memory
/// stays flat.
///
/// And keep one arena. glibc gives threads that contend for the heap
/// arenas of their own, and each keeps the freed batches it once held: the
/// crypto threads and the runtime's workers would each settle at their own
/// high-water mark. README's Benchmarks give the measured effect of both.
fn fix_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called once, before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    fix_malloc();
    // clap prints usage errors itself and exits with 2.
    let cli = pqmig::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pqmig: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(pqmig::cli::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pqmig: {e:#}");
            ExitCode::from(pqmig::cli::exit_code(&e))
        }
    }
}
