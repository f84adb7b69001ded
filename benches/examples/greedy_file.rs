//! Times the greedy coreset on projected features dumped to a file (development aid).
//!
//! The file holds the start points as `u64` little-endian values followed by the projected
//! features as `f32` little-endian values, 128 per row. Usage:
//! `cargo run --release -p patchcore-benches --example greedy_file -- FILE STARTS PICKS [REFERENCE]`.
//! The picks are written to `FILE.picks`; with `REFERENCE` they are compared with an earlier run.

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bytes = std::fs::read(&args[1]).expect("readable dump");
    let starts: usize = args[2].parse().expect("start count");
    let count: usize = args[3].parse().expect("pick count");
    let (head, tail) = bytes.split_at(starts * 8);
    let start_points: Vec<usize> = head
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
        .collect();
    let reduced: Vec<f32> = tail
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let started = Instant::now();
    let picks =
        patchcore_coreset::greedy_select(&reduced, 128, &start_points, count, &mut |_, _| {});
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{count} picks from {} rows in {seconds:.2} s ({:.2} ms per pick)",
        reduced.len() / 128,
        1e3 * seconds / count as f64
    );
    let text: String = picks.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(format!("{}.picks", args[1]), &text).expect("writable picks file");
    if let Some(reference) = args.get(4) {
        let want = std::fs::read_to_string(reference).expect("readable reference");
        println!("identical to the reference: {}", want == text);
    }
}
