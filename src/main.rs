fn main() -> std::process::ExitCode {
    rempart::cli::main()
}
