//! The `pqmig` binary: parse arguments, run the command, map errors to the
//! exit codes of SPEC §8.1. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

/// Fix glibc's mmap threshold. By default it rises each time a large
/// block is freed, after which batch-sized buffers (megabytes) come from
/// the heap and stay there: peak RSS then grows with the length of a job
/// (measured: 120 MiB after 10k wrappers, 166 MiB after 100k). Fixed at
/// 128 KiB, large buffers are mapped and returned, and memory stays flat
/// (100 and 106 MiB).
///
/// And keep one arena. glibc gives threads that contend for the heap
/// arenas of their own (up to 8 per core), and each keeps the freed
/// batches it once held: the crypto threads of the blocking pool and the
/// runtime's workers each settled at their own high-water mark, so peak
/// RSS rose for the first ~15k items of a job (66 MiB for a 100k-wrapper
/// job, against 53 MiB with one arena). Throughput did not change (few
/// threads, and malloc is about 2% of the profile).
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
