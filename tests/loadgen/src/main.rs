fn main() {
    eprintln!("the load generator is not built yet");
    std::process::exit(1);
}
