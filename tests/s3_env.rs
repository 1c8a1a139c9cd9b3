//! `open_store` for an `s3://` destination, configured as a deployment configures it: through the
//! standard AWS chain (here, profile files named by `AWS_CONFIG_FILE`), with no region set and
//! path-style addressing. A test binary of its own, with a single test, because it changes the
//! process environment.

mod common;

use bytes::Bytes;
use common::seaweed::{ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFs, unique_prefix};
use ddpm_worker::storage::{Destination, open_store};

#[test]
fn open_store_uses_the_standard_aws_configuration_chain() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let credentials = dir.path().join("credentials");
    // SAFETY: no other thread of this process reads the environment now: this binary runs one test,
    // and the runtime (with its threads) is built below.
    unsafe {
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ] {
            std::env::remove_var(var);
        }
        std::env::set_var("AWS_CONFIG_FILE", &config);
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &credentials);
        // Nothing to find on this machine; skip the instance-metadata probe.
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let server = SeaweedFs::shared().await;
        // Written only now that the port is known; the chain reads them when the store is opened.
        // A host name, not 127.0.0.1: the SDK always addresses IP endpoints path-style, so only a name
        // shows that `path_style` reaches the client (`ddpm-test.localhost` does not resolve).
        let endpoint = server.endpoint().replace("127.0.0.1", "localhost");
        std::fs::write(&config, format!("[default]\nendpoint_url = {endpoint}\n")).unwrap();
        std::fs::write(
            &credentials,
            format!("[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
        )
        .unwrap();

        let prefix = unique_prefix("env");
        let dest: Destination = format!("s3://{BUCKET}/{prefix}/").parse().unwrap();
        let store = open_store(&dest, true).await.unwrap();
        let out = store.put("m.json", Bytes::from_static(b"{}"), "application/json").await.unwrap();
        assert_eq!(out.uri, format!("s3://{BUCKET}/{prefix}/m.json"));
        assert_eq!(store.get("m.json").await.unwrap(), Some(Bytes::from_static(b"{}")));

        let raw = server.client().get_object().bucket(BUCKET).key(format!("{prefix}/m.json")).send().await;
        assert_eq!(raw.unwrap().body.collect().await.unwrap().into_bytes(), Bytes::from_static(b"{}"));
    });
}
