//! `fmhost-sandbox [--listen ADDR] [--latency-scale F] [--write-secrets FILE] [--write-input FILE]`:
//! serves the fake vendor APIs and prints `listening on http://ADDR` as its first line,
//! after writing the secrets and sample input a pipeline needs to run against it.

#[tokio::main]
async fn main() {
    let mut listen = "127.0.0.1:0".to_string();
    let mut scale = 1.0f64;
    let (mut secrets_file, mut input_file) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(v)) => listen = v,
            ("--latency-scale", Some(v)) => scale = v.parse().unwrap_or_else(|_| usage()),
            ("--write-secrets", Some(v)) => secrets_file = Some(v),
            ("--write-input", Some(v)) => input_file = Some(v),
            _ => usage(),
        }
    }
    let sandbox = fmhost_sandbox::Sandbox::start_on(
        &listen,
        fmhost_sandbox::Options {
            latency_scale: scale,
        },
    )
    .await
    .unwrap_or_else(|e| {
        eprintln!("error: cannot listen on {listen}: {e}");
        std::process::exit(1)
    });
    for (file, value) in [
        (secrets_file, sandbox.secrets()),
        (input_file, sandbox.input()),
    ] {
        if let Some(file) = file {
            if let Err(e) =
                std::fs::write(&file, serde_json::to_vec_pretty(&value).unwrap_or_default())
            {
                eprintln!("error: {file}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("listening on {}", sandbox.url());
    let _ = tokio::signal::ctrl_c().await;
}

fn usage() -> ! {
    eprintln!(
        "usage: fmhost-sandbox [--listen 127.0.0.1:0] [--latency-scale 1.0] [--write-secrets FILE] [--write-input FILE]"
    );
    std::process::exit(2)
}
