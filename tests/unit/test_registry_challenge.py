"""WWW-Authenticate parsing (berth.registry.challenge)."""

from berth.registry.challenge import Challenge, parse_challenges, pick_challenge


def test_bearer_challenge_of_docker_distribution():
    header = ('Bearer realm="https://auth.example/token",service="registry.example",'
              'scope="repository:team/app:pull,push"')
    [challenge] = parse_challenges([header])
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.service == "registry.example"
    # The comma inside the quoted scope must not split the parameter.
    assert challenge.scopes == ("repository:team/app:pull,push",)


def test_scheme_and_parameter_names_are_case_insensitive_values_are_not():
    [challenge] = parse_challenges(['BEARER Realm="http://A/Token", SERVICE=Reg'])
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "http://A/Token", "service": "Reg"}


def test_several_challenges_in_one_header_and_escaped_quotes():
    header = 'Basic realm="say \\"hi\\", friend", Bearer realm="http://t/token",service="s"'
    challenges = parse_challenges([header])
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].realm == 'say "hi", friend'
    assert challenges[1].realm == "http://t/token"


def test_several_scopes_are_split_on_spaces():
    [challenge] = parse_challenges(['Bearer realm="r",scope="repository:a:pull repository:b:pull"'])
    assert challenge.scopes == ("repository:a:pull", "repository:b:pull")


def test_garbage_and_token68_do_not_raise():
    assert parse_challenges(["", "   "]) == []
    challenges = parse_challenges(["Negotiate abc123==, Basic realm=x"])
    assert [c.scheme for c in challenges] == ["negotiate", "basic"]
    assert challenges[1].realm == "x"


def test_pick_prefers_bearer_with_realm_then_basic():
    basic = Challenge("basic", {"realm": "r"})
    bearer = Challenge("bearer", {"realm": "http://t/token"})
    bearer_without_realm = Challenge("bearer", {})
    assert pick_challenge([basic, bearer]) is bearer
    assert pick_challenge([bearer_without_realm, basic]) is basic
    assert pick_challenge([Challenge("negotiate")]) is None
