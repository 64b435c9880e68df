//! How recsysctl reaches a cluster: plaintext or mutual TLS, and the operator identity
//! its admin calls carry (a bearer token when TLS is off; with TLS the client
//! certificate, which must be an operator's, is the identity).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use recsys_runtime::{
    admin_auth::{parse_tokens, BearerToken},
    tls::TlsConfig,
    Tls,
};
use tonic::transport::Channel;

#[derive(Debug, Clone, Args)]
pub struct Access {
    /// CA certificate (PEM) that signed the cluster's certificates: turns TLS on.
    #[arg(long, global = true, env = "RECSYS_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM); an operator's for admin calls.
    #[arg(long, global = true, env = "RECSYS_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "RECSYS_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// File of `name:token` lines (the admin ports' token file); admin calls send the
    /// token of `--operator`, or of the first line.
    #[arg(long, global = true, env = "RECSYS_ADMIN_TOKEN_FILE", default_value = "target/dev/admin-tokens")]
    admin_token_file: PathBuf,
    #[arg(long, global = true, env = "RECSYS_OPERATOR")]
    operator: Option<String>,
}

impl Access {
    /// The three TLS files, when TLS is on.
    fn tls_files(&self) -> anyhow::Result<Option<(&PathBuf, &PathBuf, &PathBuf)>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
            (None, None, None) => Ok(None),
            // Never fall back to plaintext (and send a token in clear) on a partial setting.
            _ => anyhow::bail!("TLS needs all of --tls-ca, --tls-cert and --tls-key (or RECSYS_TLS_CA/CERT/KEY)"),
        }
    }

    fn tls(&self) -> anyhow::Result<Tls> {
        let Some((ca, cert, key)) = self.tls_files()? else {
            return Ok(Tls::plaintext());
        };
        let path = |path: &PathBuf| path.display().to_string();
        let config = TlsConfig {
            enabled: true,
            ca_file: path(ca),
            cert_file: path(cert),
            key_file: path(key),
            ..TlsConfig::default()
        };
        Ok(Tls::load(&config)?)
    }

    /// A channel to `address`, connecting on first use.
    pub fn channel(&self, address: &str) -> anyhow::Result<Channel> {
        recsys_runtime::client::lazy_channel(address, Duration::from_secs(2), &self.tls()?)
            .with_context(|| format!("address {address}"))
    }

    /// Adds the operator's bearer token to every call, unless TLS identifies the caller.
    pub fn operator(&self) -> anyhow::Result<BearerToken> {
        if self.tls_files()?.is_some() {
            return Ok(BearerToken::none());
        }
        let text = match std::fs::read_to_string(&self.admin_token_file) {
            Ok(text) => text,
            // No token: the admin port answers UNAUTHENTICATED, which says what is missing.
            Err(_) => return Ok(BearerToken::none()),
        };
        let (_, token) = parse_tokens(&text)
            .find(|(name, _)| self.operator.as_deref().is_none_or(|wanted| wanted == *name))
            .with_context(|| format!("no token for {:?} in {}", self.operator, self.admin_token_file.display()))?;
        BearerToken::new(token).context("the token is not a header value")
    }
}
