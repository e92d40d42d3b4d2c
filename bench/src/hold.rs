//! `hold`: open `count` connections one after the other, send a few bytes
//! on each and read them back (so the load balancer has connected the
//! backend and moved data both ways), then hold them all idle until stdin
//! reaches end-of-file.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::args::Args;

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let target = args.addr("target")?;
    let count = args.usize_or("count", 1000)?;
    let payload_len = args.usize_or("payload-bytes", 16)?.clamp(1, 4096);
    let max_errors = args.usize_or("max-errors", 50)?;
    crate::raise_nofile();
    let payload: Vec<u8> = (0..payload_len).map(|i| b'a' + (i % 26) as u8).collect();
    let mut back = vec![0u8; payload_len];
    let mut held = Vec::with_capacity(count);
    let mut errors = 0usize;
    let mut last_error = String::new();
    let t0 = Instant::now();
    while held.len() < count && errors <= max_errors {
        let r = TcpStream::connect_timeout(&target, Duration::from_secs(5)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&payload)?;
            s.read_exact(&mut back)?;
            if back != payload {
                return Err(std::io::Error::other("echo mismatch"));
            }
            Ok(s)
        });
        match r {
            Ok(s) => held.push(s),
            Err(e) => {
                errors += 1;
                last_error = e.to_string();
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "tool": "hold",
            "ready": held.len(),
            "errors": errors,
            "last_error": last_error,
            "seconds": t0.elapsed().as_secs_f64(),
        })
    );
    let _ = std::io::stdout().flush();
    // Hold until stdin closes (or says anything).
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let n = held.len();
    drop(held);
    println!("{}", serde_json::json!({"tool": "hold", "closed": n}));
    Ok(())
}
