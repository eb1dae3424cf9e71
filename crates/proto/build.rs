//! Compiles `proto/replimesh.proto` with the pure-Rust `protox`, so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/replimesh.proto");
    let fds = protox::compile(["proto/replimesh.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
