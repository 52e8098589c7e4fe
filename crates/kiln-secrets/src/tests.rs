use super::*;

fn project() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kiln-secrets-")
        .tempdir()
        .unwrap()
}

#[test]
fn set_decrypt_and_fingerprint() {
    let dir = project();
    let alice = Identity::generate();
    let bob = Identity::generate();
    let recipients = [alice.recipients(), bob.recipients()].concat();
    let p = set(
        dir.path(),
        "staging",
        "db_password",
        b"hunter2-very-secret",
        &recipients,
    )
    .unwrap();
    assert_eq!(p, dir.path().join("secrets/staging/db_password.age"));
    let on_disk = fs::read(&p).unwrap();
    assert!(on_disk.starts_with(b"age-encryption.org/v1\n"));
    assert!(
        !on_disk.windows(7).any(|w| w == b"hunter2"),
        "the file holds ciphertext only"
    );
    for who in [&alice, &bob] {
        let v = decrypt(dir.path(), "staging", "db_password", who).unwrap();
        assert_eq!(v.expose(), b"hunter2-very-secret");
        assert!(!format!("{v:?}").contains("hunter2"));
    }
    assert_eq!(
        names(dir.path(), "staging").unwrap(),
        ["db_password"],
        "the key file is not a secret"
    );
    let f1 = fingerprint(dir.path(), "staging", "db_password", &alice).unwrap();
    assert_eq!(
        f1,
        fingerprint(dir.path(), "staging", "db_password", &bob).unwrap(),
        "same key for every recipient"
    );
    assert!(f1.starts_with("b3k:") && f1.len() == 28, "{f1}");
    // Same value, re-encrypted: same fingerprint. New value: new fingerprint.
    set(
        dir.path(),
        "staging",
        "db_password",
        b"hunter2-very-secret",
        &recipients,
    )
    .unwrap();
    assert_eq!(
        fingerprint(dir.path(), "staging", "db_password", &alice).unwrap(),
        f1
    );
    set(
        dir.path(),
        "staging",
        "db_password",
        b"correct horse",
        &recipients,
    )
    .unwrap();
    let f2 = fingerprint(dir.path(), "staging", "db_password", &alice).unwrap();
    assert_ne!(f1, f2);
    // Keyed: not a plain hash of the value.
    assert!(!f2.contains(&blake3::hash(b"correct horse").to_hex()[..24]));
    let all = fingerprints(dir.path(), "staging", &["db_password".into()], &alice).unwrap();
    assert_eq!(all["db_password"], f2);
    let values = all_values(dir.path(), &alice).unwrap();
    assert_eq!(values.len(), 1);
    assert_eq!(values[0].0, "staging/db_password");
    assert!(any(dir.path()).unwrap());
}

#[test]
fn wrong_identity_and_other_recipients_are_clear_errors() {
    let dir = project();
    let alice = Identity::generate();
    let mallory = Identity::generate();
    set(
        dir.path(),
        "prod",
        "token",
        b"s3cr3t-token-value",
        &alice.recipients(),
    )
    .unwrap();
    let e = decrypt(dir.path(), "prod", "token", &mallory)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot decrypt ")
            && e.contains("token.age: it is not encrypted to this identity (age1"),
        "{e}"
    );
    assert!(!e.contains("s3cr3t"));
    let e = decrypt(dir.path(), "prod", "missing", &alice)
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("set it with `kiln secret set prod missing`"),
        "{e}"
    );
    fs::write(path(dir.path(), "prod", "junk"), b"not age").unwrap();
    let e = decrypt(dir.path(), "prod", "junk", &alice)
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.age is not a readable age file"), "{e}");
    assert!(matches!(
        check_name("../x"),
        Err(SecretError::BadName { .. })
    ));
    assert!(matches!(
        set(dir.path(), "prod", "t", b"v", &["age1nope".into()]),
        Err(SecretError::BadRecipient { .. })
    ));
    assert!(matches!(
        set(dir.path(), "prod", "t", b"", &alice.recipients()),
        Err(SecretError::Empty { .. })
    ));
}

#[test]
fn identity_from_a_key_or_a_file() {
    let dir = project();
    let id = Identity::generate();
    let key = id.to_secret_string();
    let from_key = Identity::parse(&key).unwrap();
    assert_eq!(from_key.recipients(), id.recipients());
    assert_eq!(from_key.origin, "the key in $KILN_AGE_IDENTITY");
    let file = dir.path().join("key.txt");
    fs::write(
        &file,
        format!(
            "# created: today\n# public key: {}\n{}\n",
            id.recipients()[0],
            &*key
        ),
    )
    .unwrap();
    assert_eq!(
        Identity::parse(file.to_str().unwrap())
            .unwrap()
            .recipients(),
        id.recipients()
    );
    // A broken key in the variable is reported without echoing it.
    let e = Identity::parse("AGE-SECRET-KEY-1NOTAKEY")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "age identity from the key in $KILN_AGE_IDENTITY is unusable: line 1 is not an age X25519 secret key (AGE-SECRET-KEY-1...)");
    let e = Identity::parse("/nonexistent/key.txt")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("age identity from /nonexistent/key.txt is unusable: cannot read it"),
        "{e}"
    );
}
