//! `msb-fuzz seeds DIR`: writes the seed corpus of every target to `DIR/<target>/`.
//! `msb-fuzz replay TARGET PATH...`: runs files (or every file of directories) through a
//! target's harness without libFuzzer, e.g. to check a crash's fix or the corpus.

use std::path::{Path, PathBuf};

fn files(paths: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        let p = Path::new(p);
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .expect("read directory")
                .map(|e| e.expect("entry").path())
                .collect();
            v.sort();
            out.extend(v);
        } else {
            out.push(p.to_path_buf());
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("seeds") if args.len() == 2 => {
            let root = Path::new(&args[1]);
            for target in msb_fuzz::TARGETS {
                let dir = root.join(target);
                std::fs::create_dir_all(&dir).expect("mkdir");
                for (name, data) in msb_fuzz::seeds(target) {
                    std::fs::write(dir.join(name), data).expect("write seed");
                }
            }
        }
        Some("replay") if args.len() >= 3 => {
            let target = &args[1];
            let files = files(&args[2..]);
            for f in &files {
                let data = std::fs::read(f).expect("read input");
                msb_fuzz::run(target, &data);
            }
            println!("{target}: {} inputs ran", files.len());
        }
        _ => {
            eprintln!("usage: msb-fuzz seeds DIR | msb-fuzz replay TARGET PATH...");
            std::process::exit(2);
        }
    }
}
