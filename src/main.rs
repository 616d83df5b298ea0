// mimalloc instead of the system allocator: on the request path rempart
// allocates many small, short-lived objects (headers, policy values, audit
// lines); profiling a load run showed glibc malloc/free at 18 % of the
// process's CPU (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    rempart::cli::main()
}
