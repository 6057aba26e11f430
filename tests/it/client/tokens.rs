//! `larder token …`, `larder stats`, the statistics in `larder cache
//! info`, and `larder cache audit` and `purge`, against the real server.

use larder_token::Permission;
use tests::server::TestServer;

use super::{Larder, HOUR};
use crate::server::push::{hash_of, push_visible};
use crate::server::{fake_store_path, file_nar, get, plain_metadata};

/// The value of a `Label: value` line of `larder`'s output.
fn field<'a>(output: &'a str, label: &str) -> &'a str {
    output
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(&format!("{label}: ")))
        .unwrap_or_else(|| panic!("no {label:?} in {output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_mint_list_and_revoke_within_the_users_reach() {
    let server = TestServer::sqlite().await;
    server.create_cache("team-ci", false).await;
    let lead = server
        .mint(
            "team-lead",
            HOUR,
            &[(
                "team-*",
                &[Permission::Pull, Permission::Push, Permission::ManageTokens],
            )],
        )
        .await;
    let larder = Larder::new();
    larder.ok(&["login", "local", &server.url(), &lead]).await;

    let me = larder.ok(&["token", "whoami"]).await;
    assert_eq!(field(&me, "Subject"), "team-lead");
    assert_eq!(field(&me, "Cache"), "team-* = pull,push,manage_tokens");
    assert_eq!(field(&me, "Status"), "valid");

    let out = larder
        .ok(&[
            "token",
            "create",
            "ci-bot",
            "--validity",
            "30 minutes",
            "--grant",
            "team-ci=pull,push",
        ])
        .await;
    let token = out.lines().last().expect("the token on the last line");
    let bot = Larder::new();
    bot.ok(&["login", "local", &server.url(), token]).await;
    let bot_me = bot.ok(&["token", "whoami"]).await;
    assert_eq!(field(&bot_me, "Subject"), "ci-bot");
    assert_eq!(field(&bot_me, "Cache"), "team-ci = pull,push");
    let jti = field(&bot_me, "Token id").to_owned();
    assert_eq!(field(&out, "Token id"), jti);

    let list = larder.ok(&["token", "list"]).await;
    assert!(list.contains(&jti) && list.contains("team-lead"), "{list}");
    let list = larder.ok(&["token", "list", "--subject", "ci-bot"]).await;
    assert!(list.contains(&jti) && !list.contains("team-lead"), "{list}");
    // The bot manages no tokens: it sees only its own.
    let list = bot.ok(&["token", "list"]).await;
    assert_eq!(list.lines().count(), 2, "{list}");

    // More than the user holds, or longer, or unknown: the server says why.
    for (validity, grant, expected) in [
        ("30 minutes", "*=pull", "cannot mint"),
        ("2 hours", "team-ci=pull", "expire"),
        ("1 hour", "team-ci=fly", "fly"),
    ] {
        let create = [
            "token",
            "create",
            "x",
            "--validity",
            validity,
            "--grant",
            grant,
        ];
        let line = larder.fails(&create).await;
        assert!(line.contains(expected), "{create:?}: {line}");
    }
    // A grant that is not PATTERN=PERMISSIONS is clap's to refuse.
    let output = larder
        .run(&[
            "token",
            "create",
            "x",
            "--validity",
            "1 hour",
            "--grant",
            "team-ci",
        ])
        .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(super::text(&output.stderr).contains("PATTERN=PERMISSIONS"));
    let line = larder.fails(&["token", "revoke", "../x"]).await;
    assert!(line.contains("not a token id"), "{line}");

    let out = larder.ok(&["token", "revoke", &jti]).await;
    assert!(
        out.contains(&format!("revoked token {jti} of ci-bot")),
        "{out}"
    );
    let line = bot.fails(&["token", "whoami"]).await;
    assert!(line.contains("revoked"), "{line}");
    let list = larder.ok(&["token", "list", "--subject", "ci-bot"]).await;
    assert!(list.contains("revoked"), "{list}");
}

#[tokio::test]
async fn cache_info_shows_a_tenants_figures_and_stats_the_servers() {
    let server = TestServer::sqlite().await;
    server.create_cache("figures", false).await;
    let store_path = fake_store_path("hello");
    let nar = file_nar(b"hello, figures");
    server
        .seed_path("figures", plain_metadata(&store_path), &nar)
        .await;
    let operator = Larder::new();
    operator
        .ok(&["login", "local", &server.url(), &server.root_token().await])
        .await;

    let info = operator.ok(&["cache", "info", "figures"]).await;
    assert_eq!(field(&info, "Paths"), "1");
    assert!(field(&info, "NAR bytes").ends_with(" B"), "{info}");
    assert!(field(&info, "Stored").contains("× smaller"), "{info}");
    assert_ne!(field(&info, "Last push"), "never");

    let stats = operator.ok(&["stats"]).await;
    assert!(stats.starts_with("1 paths, "), "{stats}");
    assert!(
        stats.lines().any(|line| line.starts_with("figures ")),
        "{stats}"
    );

    let puller = Larder::new();
    let token = server
        .mint("puller", HOUR, &[("figures", &[Permission::Pull])])
        .await;
    puller.ok(&["login", "local", &server.url(), &token]).await;
    let info = puller.ok(&["cache", "info", "figures"]).await;
    assert_eq!(field(&info, "Paths"), "1");
    let line = puller.fails(&["stats"]).await;
    assert!(line.contains("configure_cache_quota"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_audit_and_purge_list_and_delete_what_a_subject_pushed() {
    let server = TestServer::sqlite().await;
    server.create_cache("team", false).await;
    let ci = server
        .mint("ci", HOUR, &[("team", &[Permission::Push])])
        .await;
    let dev = server
        .mint("dev", HOUR, &[("team", &[Permission::Push])])
        .await;
    let [from_ci, from_dev] = ["from-ci", "from-dev"].map(fake_store_path);
    for (token, store_path) in [(&ci, &from_ci), (&dev, &from_dev)] {
        let nar = file_nar(store_path.as_bytes());
        push_visible(&server, token, "team", store_path, &nar).await;
    }
    let owner = Larder::new();
    let token = server
        .mint(
            "owner",
            HOUR,
            &[(
                "team",
                &[
                    Permission::Pull,
                    Permission::Delete,
                    Permission::ConfigureCache,
                ],
            )],
        )
        .await;
    owner.ok(&["login", "local", &server.url(), &token]).await;

    let audit = owner.ok(&["cache", "audit", "team"]).await;
    let pushes = audit
        .lines()
        .filter(|line| line.contains(" push "))
        .collect::<Vec<_>>();
    assert_eq!(pushes.len(), 2, "{audit}");
    assert!(
        pushes[0].contains(" dev ") && pushes[0].contains(&from_dev),
        "{audit}"
    );
    assert!(
        pushes[1].contains(" ci ") && pushes[1].contains(&from_ci),
        "{audit}"
    );

    // A dry run by default: listed, still served.
    let output = owner
        .run(&["cache", "purge", "team", "--pushed-by", "ci"])
        .await;
    assert!(output.status.success());
    assert_eq!(super::text(&output.stdout).trim(), from_ci);
    assert!(super::text(&output.stderr).contains("would be deleted"));
    let status = |store_path: &str| {
        let path = format!("/team/{}.narinfo", hash_of(store_path));
        let (server, token) = (&server, token.clone());
        async move { get(server, &path, Some(&token)).await.status().as_u16() }
    };
    assert_eq!(status(&from_ci).await, 200);
    let out = owner
        .ok(&[
            "cache",
            "purge",
            "team",
            "--pushed-by",
            "ci",
            "--since",
            "1 day",
            "--yes",
        ])
        .await;
    assert_eq!(out.trim(), from_ci);
    assert_eq!(status(&from_ci).await, 404);
    assert_eq!(status(&from_dev).await, 200);
    let audit = owner.ok(&["cache", "audit", "team", "--limit", "1"]).await;
    assert!(
        audit.contains(" delete ") && audit.contains(&from_ci),
        "{audit}"
    );

    for args in [
        &["cache", "purge", "team"][..],
        &["cache", "purge", "team", "--pushed-by", "a", "--token", "b"],
        &[
            "cache",
            "purge",
            "team",
            "--pushed-by",
            "a",
            "--since",
            "last week",
        ],
        &["cache", "audit", "team", "--limit", "0"],
    ] {
        let output = owner.run(args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}
