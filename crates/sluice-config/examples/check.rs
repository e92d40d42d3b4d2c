//! `cargo run -p sluice-config --example check -- FILE...`: load each file
//! and print its summary or its diagnostics (what `sluice check` does,
//! without the binary).

fn main() {
    for arg in std::env::args().skip(1) {
        match sluice_config::load_file(std::path::Path::new(&arg)) {
            Ok(cfg) => print!("{}", sluice_config::summary(&cfg)),
            Err(e) => println!("{e}"),
        }
    }
}
