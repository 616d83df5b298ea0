// mimalloc instead of the system allocator: on the request path rempart
// allocates many small, short-lived objects (headers, policy values, audit
// lines); profiling a load run showed glibc malloc/free at 18 % of the
// process's CPU (docs/performance.md). Built with `no_thp`, which turns
// transparent huge pages off for the whole process (prctl
// PR_SET_THP_DISABLE; MIMALLOC_ALLOW_THP=1 turns them back on): mimalloc's
// arenas otherwise get them, and each 2 MiB page counts whole in RSS
// however little of it is used (idle 35 -> 22 MiB, peak under 256
// connections 75 -> 48 MiB, no throughput change measured).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    rempart::cli::main()
}
