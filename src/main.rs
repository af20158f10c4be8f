fn main() -> std::process::ExitCode {
    lcfs::cli::main()
}
