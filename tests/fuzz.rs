//! Fuzzing on the stable toolchain (issue 9): each cargo-fuzz target in
//! `fuzz/` runs here on its seed corpus (`fuzz/corpus/<target>/`), then on
//! mutations of it and on random bytes, for a bounded number of cases and
//! seconds. No input may panic or take more than [`CASE_LIMIT`].
//!
//! Bounds: `CUTOVER_FUZZ_CASES` (default 1000000) and `CUTOVER_FUZZ_SECONDS`
//! (default 3) per target, whichever ends first; `CUTOVER_FUZZ_SEED` repeats a
//! run. A failing input is saved under `target/fuzz-failures/` and named in
//! the failure; `fuzz/run-long` runs longer.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The most one input may take (debug build): parsers are linear in their input.
const CASE_LIMIT: Duration = Duration::from_secs(2);

/// The longest input the mutator makes.
const MAX_INPUT: usize = 64 * 1024;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// splitmix64: a seeded generator, so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens the protocols and files are made of, spliced in by the mutator so
/// mutations reach past the first syntax check.
fn dictionary(target: &str) -> &'static [&'static [u8]] {
    match target {
        "config" => &[
            b"\n",
            b": ",
            b"- ",
            b"{",
            b"}",
            b"[",
            b"]",
            b"&a ",
            b"*a",
            b"<<: ",
            b"!!binary ",
            b"'",
            b"\"",
            b"\t",
            b"environments",
            b"checks",
            b"defaults",
            b"credentials",
            b"migration",
            b"kind: ",
            b"http",
            b"tcp",
            b"smtp",
            b"imap",
            b"dns",
            b"mailflow",
            b"mail_auth",
            b"interval: ",
            b"timeout: ",
            b"1ns",
            b"99999999999h",
            b"addresses: [127.0.0.10]",
            b"resolver: 127.0.0.30",
            b"pattern: ",
            b"(a+)+$",
            b"\xc3\xa9",
            b"\xef\xbb\xbf",
            b"phases",
            b"2026-11-28T22:00:00+01:00",
            b"password_file: ",
            b"max_concurrent_probes: ",
            b"0",
            b"-1",
            b"18446744073709551616",
            b"~",
            b"null",
            b"yes",
        ],
        "web_config" => &[
            b"\n",
            b": ",
            b"- ",
            b"tls_server_config",
            b"cert_file",
            b"key_file",
            b"client_ca_file",
            b"min_version",
            b"TLS13",
            b"TLS10",
            b"cipher_suites",
            b"curve_preferences",
            b"http_server_config",
            b"headers",
            b"basic_auth_users",
            b"$2y$10$",
            b"$2b$04$",
            b"auth_excluded_paths",
            b"/metrics",
            b"client_auth_type",
            b"RequireAndVerifyClientCert",
            b"X-Frame-Options",
            b"deny",
            b"\"",
            b"{",
            b"}",
        ],
        "smtp_reply" => &[
            b"\r\n",
            b"\n",
            b"220 ",
            b"250-",
            b"250 ",
            b"354 ",
            b"421 ",
            b"535 ",
            b"199 ",
            b"600 ",
            b"25",
            b"-",
            b" ",
            b"\xff",
            b"\xc3",
            b"\0",
            b"AUTH PLAIN LOGIN",
            b"STARTTLS",
            b"SIZE 0",
        ],
        "imap_stream" => &[
            b"\r\n",
            b"* OK ",
            b"* ",
            b"a1 OK ",
            b"+ ",
            b"{",
            b"}",
            b"{0}\r\n",
            b"{5}\r\n",
            b"{4294967296}\r\n",
            b"{1048577}\r\n",
            b"~{3}\r\n",
            b"(",
            b")",
            b"\"",
            b"\\",
            b"NIL",
            b"FETCH",
            b"BODY[]",
            b"UID 7",
            b"CAPABILITY IMAP4rev1",
            b"[UIDVALIDITY 1]",
            b"EXISTS",
            b"LIST (\\HasNoChildren) \"/\" ",
            b"BYE",
        ],
        "dns_answer" => &[
            b"\n",
            b",",
            b"127.0.0.10",
            b"::1",
            b"10 mx.example.test",
            b"0 5 993 imap.example.test",
            b"example.test.",
            b"\xc0\x0c",
            b"\x00\x01",
            b"\x00\x00\x0e\x10",
            b"\xff\xff",
        ],
        "mail_marker" => &[
            b"\n",
            b" ",
            b"v1",
            b"instance=",
            b"id=",
            b"mac=",
            b"00",
            b"ff",
            b"\t",
            b"\xc3\xa9",
        ],
        _ => &[],
    }
}

/// One mutation of `input`, libFuzzer style.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    let at = |rng: &mut Rng, len: usize| rng.below(len + 1);
    match rng.below(9) {
        0 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] ^= 1 << rng.below(8);
        }
        1 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = [0, 0xff, 0x7f, 0x80, b'\n', b'\r', b' ', b'9'][rng.below(8)];
        }
        2 => {
            let i = at(rng, input.len());
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(i..i, bytes);
        }
        3 if !input.is_empty() => {
            let i = rng.below(input.len());
            let n = 1 + rng.below((input.len() - i).min(64));
            input.drain(i..i + n);
        }
        4 if !input.is_empty() => {
            // Repeat a piece: long lines, deep nesting, many replies.
            let i = rng.below(input.len());
            let n = 1 + rng.below((input.len() - i).min(32));
            let piece = input[i..i + n].to_vec();
            let times = 1 + rng.below(64);
            let j = at(rng, input.len());
            input.splice(j..j, piece.repeat(times));
        }
        5 if !corpus.is_empty() => {
            // Crossover: the head of this input, the tail of another.
            let other = &corpus[rng.below(corpus.len())];
            let i = at(rng, input.len());
            let j = at(rng, other.len());
            input.truncate(i);
            input.extend_from_slice(&other[j..]);
        }
        6 if !input.is_empty() => {
            let i = rng.below(input.len());
            input.truncate(i);
        }
        _ if !dict.is_empty() => {
            let token = dict[rng.below(dict.len())];
            let i = at(rng, input.len());
            input.splice(i..i, token.iter().copied());
        }
        _ => input.push(rng.next() as u8),
    }
    input.truncate(MAX_INPUT);
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).expect("a corpus file")).collect()
}

/// Saves a failing input where the failure message points.
fn save(target: &str, input: &[u8]) -> PathBuf {
    let dir = root().join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).expect("target/fuzz-failures");
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let file = dir.join(format!("{target}-{hash:016x}"));
    std::fs::write(&file, input).expect("the failing input");
    file
}

/// Runs one case; on a panic or an over-long run, fails naming the saved input.
fn case(target: &str, input: &[u8], seed: u64) {
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| targets::run(target, input)));
    let took = started.elapsed();
    let why = match outcome {
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into()),
        Ok(()) if took > CASE_LIMIT => format!("took {took:?}, more than {CASE_LIMIT:?}"),
        Ok(()) => return,
    };
    let file = save(target, input);
    panic!(
        "fuzz target `{target}` failed on {} (seed {seed}, {} bytes): {why}\nrepeat: CUTOVER_FUZZ_SEED={seed} cargo test --test fuzz {target}",
        file.display(),
        input.len()
    );
}

fn fuzz(target: &str) {
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "fuzz/corpus/{target}/ is empty");
    let seed = env_or(
        "CUTOVER_FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let cases: u64 = env_or("CUTOVER_FUZZ_CASES", 1_000_000);
    let budget = Duration::from_secs_f64(env_or("CUTOVER_FUZZ_SECONDS", 3.0));
    let dict = dictionary(target);
    let mut rng = Rng(seed);
    let started = Instant::now();
    for input in &seeds {
        case(target, input, seed);
    }
    let mut done = 0u64;
    while done < cases && started.elapsed() < budget {
        let input = if rng.below(10) == 0 {
            (0..rng.below(512)).map(|_| rng.next() as u8).collect()
        } else {
            let mut input = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(8) {
                mutate(&mut rng, &mut input, &seeds, dict);
            }
            input
        };
        case(target, &input, seed);
        done += 1;
    }
    eprintln!(
        "fuzz {target}: {} seeds + {done} generated inputs in {:.1?} (seed {seed}), no panic",
        seeds.len(),
        started.elapsed()
    );
    assert!(done > 0 || cases == 0, "no generated input ran within {budget:?}");
}

#[test]
fn config_loader_survives_any_text() {
    fuzz("config");
}

#[test]
fn web_config_loader_survives_any_text() {
    fuzz("web_config");
}

#[test]
fn smtp_reply_reader_survives_any_bytes() {
    fuzz("smtp_reply");
}

#[test]
fn imap_stream_and_literal_guard_survive_any_bytes() {
    fuzz("imap_stream");
}

#[test]
fn dns_answer_classification_survives_any_reply() {
    fuzz("dns_answer");
}

#[test]
fn mail_marker_check_survives_any_header() {
    fuzz("mail_marker");
}

#[test]
fn every_cargo_fuzz_target_has_a_test_and_a_corpus() {
    let tests = std::fs::read_to_string(root().join("tests/fuzz.rs")).expect("tests/fuzz.rs");
    for target in targets::TARGETS {
        assert!(
            tests.contains(&format!("fuzz(\"{target}\")")),
            "no test runs `{target}`"
        );
        assert!(
            Path::new(&root().join(format!("fuzz/fuzz_targets/{target}.rs"))).exists(),
            "no fuzz/fuzz_targets/{target}.rs"
        );
        assert!(!corpus(target).is_empty(), "empty corpus for `{target}`");
    }
}
