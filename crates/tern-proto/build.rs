fn main() {
    // A vendored protoc keeps the build independent of what the machine has installed.
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY-free: build scripts are single-threaded when they set env vars.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // Bulk data as `Bytes`: a read buffer is split into messages
        // without copying it.
        .bytes(".tern.v1.DataChunk.data")
        .compile_protos(&["proto/tern.proto"], &["proto"])
        .expect("compile tern.proto");
    println!("cargo:rerun-if-changed=proto/tern.proto");
}
