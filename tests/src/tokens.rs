//! Real keys and signed tokens for the identity tests: key pairs made by
//! the `openssl` command line (RSA, P-256, Ed25519), HMAC secrets from the
//! OS's random generator, tokens signed with `jsonwebtoken` (an
//! implementation the hub does not share its configuration with), and the
//! forged tokens an attacker would send.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// A directory for one test's keys and config, removed on drop.
pub struct KeyDir {
    pub path: PathBuf,
}

impl KeyDir {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fengda-keys-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the key directory");
        Self { path }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `text` to `name` in the directory (atomically: a hub reloading
    /// never reads half a file).
    pub fn write(&self, name: &str, text: &[u8]) -> PathBuf {
        let path = self.file(name);
        let partial = self.file(&format!(".{name}.partial"));
        std::fs::write(&partial, text).expect("write");
        std::fs::rename(&partial, &path).expect("rename");
        path
    }

    /// A fresh 64-byte HMAC secret, written to `name`.
    pub fn hmac_secret(&self, name: &str) -> Signer {
        use std::io::Read;
        let mut bytes = [0u8; 48];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("urandom");
        // Printable, as operators keep secrets in files.
        let secret = URL_SAFE_NO_PAD.encode(bytes).into_bytes();
        let path = self.write(name, &secret);
        Signer { key: EncodingKey::from_secret(&secret).expect("an HMAC key"), public: secret, path }
    }

    /// A key pair made by `openssl genpkey`: `rsa`, `ec` (P-256) or `ed25519`.
    /// The public key (PEM) is written to `<name>.pem`.
    pub fn key_pair(&self, name: &str, kind: &str) -> Signer {
        let private = self.file(&format!("{name}.key"));
        let public = self.file(&format!("{name}.pem"));
        let mut generate = Command::new("openssl");
        generate.args(["genpkey", "-out"]).arg(&private);
        match kind {
            "rsa" => generate.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
            "ec" => generate.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
            "ed25519" => generate.args(["-algorithm", "ed25519"]),
            other => panic!("unknown key kind {other}"),
        };
        run(&mut generate);
        run(Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&private).arg("-out").arg(&public));
        let pem = std::fs::read(&private).expect("private key");
        let key = match kind {
            "rsa" => EncodingKey::from_rsa_pem(&pem),
            "ec" => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .expect("a PKCS#8 private key");
        Signer { key, public: std::fs::read(&public).expect("public key"), path: public }
    }
}

impl Default for KeyDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn run(command: &mut Command) {
    let output = command.output().expect("run openssl (apt-get install -y openssl)");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A signing key, with what the hub is given to verify it.
pub struct Signer {
    pub key: EncodingKey,
    /// The HMAC secret, or the public key in PEM.
    pub public: Vec<u8>,
    /// The file the hub's config names.
    pub path: PathBuf,
}

impl Signer {
    /// A token with these claims, signed with `alg`, naming `kid` if given.
    pub fn sign(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let header = Header { kid: kid.map(str::to_owned), ..Header::new(alg) };
        jsonwebtoken::encode(&header, claims, &self.key).expect("sign")
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The claims of a customer token valid for ten minutes.
pub fn claims(tenant: &str, user: &str) -> Value {
    json!({ "sub": user, "tid": tenant, "role": "customer", "exp": now() + 600, "iat": now() })
}

/// `claims` with `changes` merged in (a `null` removes the claim).
pub fn with(mut claims: Value, changes: Value) -> Value {
    for (key, value) in changes.as_object().expect("an object") {
        match value {
            Value::Null => claims.as_object_mut().unwrap().remove(key),
            value => claims.as_object_mut().unwrap().insert(key.clone(), value.clone()),
        };
    }
    claims
}

/// An unsigned token whose header says `alg` (`none`, `None`, …).
pub fn unsigned(alg: &str, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({ "alg": alg, "typ": "JWT" }).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// `token` with its payload replaced by `claims`, signature kept.
pub fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<_> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2])
}

/// A JWK of an Ed25519 public key in PEM (its last 32 DER bytes), for a JWKS.
pub fn ed25519_jwk(public_pem: &[u8], kid: &str) -> Value {
    let body: String =
        std::str::from_utf8(public_pem).unwrap().lines().filter(|line| !line.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).expect("PEM body");
    let x = URL_SAFE_NO_PAD.encode(&der[der.len() - 32..]);
    json!({ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig" })
}

/// A path as a TOML string.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}
