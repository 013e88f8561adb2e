fn main() -> std::process::ExitCode {
    fmhost::cli::main()
}
