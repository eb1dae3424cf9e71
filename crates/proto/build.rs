//! Compiles `proto/replimesh.proto` with the pure-Rust `protox`, so no `protoc`
//! is needed, and generates canonical proto3 JSON (serde) impls with `pbjson-build`.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/replimesh.proto");
    let fds = protox::compile(["proto/replimesh.proto"], ["proto"])?;
    let descriptor_bytes = fds.encode_to_vec();
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    config.compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        // As protobuf decoders do: a newer peer's fields and frame kinds are
        // skipped (a frame of an unknown kind decodes with no `body`).
        .ignore_unknown_fields()
        .build(&[".replimesh.v1"])?;
    Ok(())
}
