"""API keys, the metrics token, rate limits, CORS and security headers, over real HTTP on the real small model."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.headers import CONTENT_SECURITY_POLICY
from app.main import create_app
from app.routes import STATIC_DIR
from app.security import KeyConfigError, hashed_key_line
from app.settings import Settings
from tests.app.conftest import TEST_MODEL_NAME
from tests.support.images import drawn_image, encode, pair_files
from tests.support.service import running_service

Serve = Callable[..., AbstractContextManager[str]]
KEY = "k3y-for-tests-0123456789abcdef"
OTHER_KEY = "another-k3y-for-tests-fedcba9876"
ORIGIN = "https://app.example.com"
PROBLEM = "application/problem+json"


def _http(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, trust_env=False)


def _pair() -> dict[str, tuple[str, bytes]]:
    return pair_files(encode(drawn_image(1), "PNG"), encode(drawn_image(2), "JPEG"))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["detail"]
    return body


def _request_log(captured: str) -> list[dict]:
    """The request log lines the service wrote (JSON lines on stderr)."""
    lines = [json.loads(line) for line in captured.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == "request"]


# ---------------------------------------------------------------- API keys


def test_without_a_valid_key_the_api_answers_401_with_a_bearer_challenge(serve: Serve) -> None:
    with serve(api_keys=f"{KEY},{OTHER_KEY}") as url, _http(url) as http:
        for path, send in (("/similarity", "post"), ("/explain", "post"), ("/model", "get")):
            kwargs = {"files": _pair()} if send == "post" else {}
            missing = getattr(http, send)(path, **kwargs)
            assert "needs an API key" in _assert_problem(missing, 401)["detail"]
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = getattr(http, send)(path, headers=_bearer("not-" + KEY), **kwargs)
            assert "is not an API key of this service" in _assert_problem(wrong, 401)["detail"]
            assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        # Not a Bearer credential: as if none was sent.
        basic = http.get("/model", headers={"Authorization": f"Basic {KEY}"})
        _assert_problem(basic, 401)
        # The open endpoints stay open.
        for path in ("/healthz", "/readyz", "/", "/static/app.js", "/docs", "/redoc", "/metrics", "/openapi.json"):
            assert http.get(path).status_code == 200, path
        # Refused requests did not stop the service.
        assert http.get("/model", headers=_bearer(KEY)).status_code == 200
        # /docs can send a key: the schema names both ways, on the protected operations only.
        schema = http.get("/openapi.json").json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKeyHeader"}
        assert schema["paths"]["/similarity"]["post"]["security"] == [{"bearer": []}, {"apiKeyHeader": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]


def test_the_right_key_is_served_as_bearer_or_x_api_key(serve: Serve) -> None:
    with serve(api_keys=f"{KEY}, {OTHER_KEY}") as url, _http(url) as http:
        files = _pair()
        by_bearer = http.post("/similarity", files=files, headers=_bearer(KEY))
        assert by_bearer.status_code == 200, by_bearer.text
        by_header = http.post("/similarity", files=files, headers={"X-API-Key": OTHER_KEY})
        assert by_header.status_code == 200, by_header.text
        assert by_header.json()["score"] == pytest.approx(by_bearer.json()["score"], abs=1e-5)
        explained = http.post("/explain", files=files, headers={"X-API-Key": KEY}, data={"max_side": "64"})
        assert explained.status_code == 200 and explained.json()["explanations"]["factual"]["image1"]["overlay"]
        assert http.get("/model", headers=_bearer(OTHER_KEY)).json()["name"] == "tiny"


def test_a_keys_file_of_hashed_lines_holds_no_key_and_logs_show_ids_only(
    serve: Serve, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# who may call siamcam\n\n{hashed_key_line('alice', KEY)}\n{OTHER_KEY}\n")
    assert KEY not in keys_file.read_text()
    with serve(api_keys_file=keys_file) as url, _http(url) as http:
        assert http.get("/model", headers=_bearer(KEY)).status_code == 200
        assert http.get("/model", headers={"X-API-Key": OTHER_KEY}).status_code == 200
        wrong_key = KEY[::-1]
        assert http.get("/model", headers=_bearer(wrong_key)).status_code == 401
        assert http.get("/healthz").status_code == 200
    captured = capfd.readouterr()
    output = captured.out + captured.err
    for secret in (KEY, OTHER_KEY, wrong_key):
        assert secret not in output, "a key was written to the logs"
    by_path = [(line["path"], line["status"], line["key_id"]) for line in _request_log(captured.err)]
    other_id = hashlib.sha256(OTHER_KEY.encode()).hexdigest()[:8]
    assert by_path == [("/model", 200, "alice"), ("/model", 200, other_id), ("/model", 401, None),
                       ("/healthz", 200, None)]


@pytest.mark.parametrize(("content", "message"), [
    ("# no key yet\n", "holds no key"),
    ("two words\n", "cannot contain spaces"),
    (f"{hashed_key_line('bob', KEY)}\n{hashed_key_line('bob', OTHER_KEY)}\n", "used twice"),
])
def test_an_unusable_keys_file_stops_start_up_saying_what_to_fix(
    test_settings: Callable[..., Settings], tmp_path: Path, content: str, message: str
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(content)
    with pytest.raises(KeyConfigError, match=message):
        create_app(test_settings(api_keys_file=keys_file))
    with pytest.raises(KeyConfigError, match="cannot read API_KEYS_FILE"):
        create_app(test_settings(api_keys_file=tmp_path / "missing"))


def test_uvicorn_stops_with_one_clear_line_when_the_keys_file_holds_no_key(model_store: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("# no key yet\n")
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "API_KEYS_FILE": str(keys_file)}
    with running_service(env, tmp_path / "uvicorn.log", wait_ready=False) as replica:
        replica.process.wait(timeout=120)
    log = replica.log_path.read_text()
    assert replica.process.returncode == 1 and "Traceback" not in log, log
    (critical,) = [json.loads(line) for line in log.splitlines() if '"CRITICAL"' in line]
    assert "holds no key" in critical["message"] and str(keys_file) in critical["message"]


def test_metrics_need_their_own_token_when_one_is_set(serve: Serve) -> None:
    token = "metrics-t0ken-for-tests"
    with serve(metrics_token=token, api_keys=KEY) as url, _http(url) as http:
        missing = http.get("/metrics")
        assert "needs the metrics token" in _assert_problem(missing, 401)["detail"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert http.get("/metrics", headers=_bearer(KEY)).status_code == 401, "an API key is not the token"
        scraped = http.get("/metrics", headers=_bearer(token))
        assert scraped.status_code == 200 and "siamcam_requests_total" in scraped.text
        assert http.get("/model", headers=_bearer(token)).status_code == 401, "the token is not an API key"


# ---------------------------------------------------------------- rate limits


def _rate_fields(response: httpx.Response) -> tuple[int, int]:
    """(remaining, seconds until one more request is allowed) from the RateLimit field."""
    match = re.fullmatch(r'"default";r=(\d+);t=(\d+)', response.headers["ratelimit"])
    assert match, response.headers["ratelimit"]
    return int(match.group(1)), int(match.group(2))


def test_a_burst_is_answered_partly_429_then_served_again_after_waiting(serve: Serve) -> None:
    burst = 3
    with serve(rate_limit_per_s=1, rate_limit_burst=burst) as url, _http(url) as http:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: http.get("/model"), range(8)))
        served = [answer for answer in answers if answer.status_code == 200]
        refused = [answer for answer in answers if answer.status_code == 429]
        # Eight at once against three a window (of burst / rate = 3 s): three served, the others refused.
        assert len(served) == burst and len(refused) == len(answers) - burst
        for answer in answers:
            assert answer.headers["ratelimit-policy"] == f'"default";q={burst};w={burst}'
        assert sorted(_rate_fields(answer)[0] for answer in served) == list(range(burst)), "remaining counts down"
        for answer in refused:
            assert "retry after" in _assert_problem(answer, 429)["detail"]
            retry_after = int(answer.headers["retry-after"])
            # When the first request served leaves the 3 s window: after 3 s at most, 2 s at least (8 requests
            # take well under a second).
            assert 2 <= retry_after <= burst
            remaining, reset = _rate_fields(answer)
            assert remaining == 0 and reset == retry_after
        # The inference endpoints draw from the same count, refused before the upload is read.
        assert http.post("/similarity", files=_pair()).status_code == 429
        time.sleep(max(int(answer.headers["retry-after"]) for answer in refused) + 0.1)
        again = http.get("/model")
        assert again.status_code == 200 and _rate_fields(again)[0] == burst - 1
        # Unlimited endpoints stay open to the throttled caller.
        assert http.get("/healthz").status_code == 200 and "ratelimit" not in http.get("/healthz").headers


def test_each_key_has_its_own_limit(serve: Serve) -> None:
    with serve(api_keys=f"{KEY},{OTHER_KEY}", rate_limit_per_s=0.2, rate_limit_burst=2) as url, _http(url) as http:
        statuses = [http.get("/model", headers=_bearer(KEY)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert http.get("/model", headers=_bearer(OTHER_KEY)).status_code == 200
        # A caller without a key is refused for that, not counted against anyone.
        assert http.get("/model").status_code == 401


def test_without_keys_each_client_address_has_its_own_limit(serve: Serve) -> None:
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default (its FORWARDED_ALLOW_IPS), as a replica trusts
    # the balancer's: the limiter counts the address uvicorn resolved, not the balancer's.
    with serve(rate_limit_per_s=0.2, rate_limit_burst=1) as url, _http(url) as http:
        first = {"X-Forwarded-For": "203.0.113.7"}
        assert [http.get("/model", headers=first).status_code for _ in range(2)] == [200, 429]
        assert http.get("/model", headers={"X-Forwarded-For": "203.0.113.8"}).status_code == 200
        assert http.get("/model").status_code == 200, "127.0.0.1 itself is a third client"


def test_the_burst_defaults_to_one_seconds_worth() -> None:
    assert Settings(_env_file=None, rate_limit_per_s=2.5).rate_limit_bucket_size == 3
    assert Settings(_env_file=None, rate_limit_per_s=0.1).rate_limit_bucket_size == 1
    assert Settings(_env_file=None, rate_limit_per_s=2.5, rate_limit_burst=7).rate_limit_bucket_size == 7


def test_the_window_holds_the_burst_at_the_rate_in_whole_seconds() -> None:
    assert Settings(_env_file=None, rate_limit_per_s=10, rate_limit_burst=20).rate_limit_window_s == 2
    assert Settings(_env_file=None, rate_limit_per_s=0.2, rate_limit_burst=2).rate_limit_window_s == 10
    assert Settings(_env_file=None, rate_limit_per_s=500, rate_limit_burst=500).rate_limit_window_s == 1
    assert Settings(_env_file=None, rate_limit_per_s=50, rate_limit_burst=1).rate_limit_window_s == 1, "at least 1"


def test_the_rate_limit_store_must_be_one_siamcam_can_use() -> None:
    assert Settings(_env_file=None).rate_limit_storage == "memory://"
    assert Settings(_env_file=None, rate_limit_storage="redis://redis:6379/0").rate_limit_storage.startswith("redis")
    with pytest.raises(ValidationError, match="write memory:// .* or redis://host:port"):
        Settings(_env_file=None, rate_limit_storage="memcached://cache:11211")


# ---------------------------------------------------------------- CORS


def _preflight(http: httpx.Client, origin: str) -> httpx.Response:
    return http.options("/similarity", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, x-request-id",
    })


def test_cors_preflight_is_allowed_for_a_listed_origin_only(serve: Serve) -> None:
    with serve(cors_origins=f"{ORIGIN}, http://localhost:3000", api_keys=KEY) as url, _http(url) as http:
        allowed = _preflight(http, ORIGIN)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        refused = _preflight(http, "https://evil.example.net")
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        # The actual request: its answer (a 401 here too) is readable by the allowed page, with what it exposes.
        answer = http.get("/model", headers={"Origin": ORIGIN})
        assert answer.status_code == 401 and answer.headers["access-control-allow-origin"] == ORIGIN
        exposed = answer.headers["access-control-expose-headers"].lower()
        assert {"x-request-id", "retry-after", "ratelimit", "ratelimit-policy"} <= set(re.split(r",\s*", exposed))
        assert "access-control-allow-origin" not in http.get("/model", headers={"Origin": "https://x.test"}).headers


def test_by_default_the_api_is_open_and_documented_without_keys(client: httpx.Client) -> None:
    assert client.get("/model").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert "security" not in schema["paths"]["/similarity"]["post"]


def test_by_default_no_other_origin_may_call_the_api(client: httpx.Client) -> None:
    refused = _preflight(client, ORIGIN)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in client.get("/model", headers={"Origin": ORIGIN}).headers


def test_cors_origins_must_be_origins() -> None:
    with pytest.raises(ValidationError, match="without a path or a trailing slash"):
        Settings(_env_file=None, cors_origins="https://app.example.com/")


# ---------------------------------------------------------------- security headers


def _assert_security_headers(response: httpx.Response, with_csp: bool = True) -> None:
    assert response.headers["x-content-type-options"] == "nosniff", response.url
    assert response.headers["referrer-policy"] == "no-referrer", response.url
    assert (response.headers.get("content-security-policy") == CONTENT_SECURITY_POLICY) == with_csp, response.url


def test_security_headers_are_on_every_answer(serve: Serve) -> None:
    with serve(api_keys=KEY, rate_limit_per_s=0.1, rate_limit_burst=1) as url, _http(url) as http:
        answers = [
            http.get("/"), http.get("/static/app.js"), http.get("/static/style.css"), http.get("/healthz"),
            http.get("/model", headers=_bearer(KEY)),  # 200
            http.get("/model", headers=_bearer(KEY)),  # 429
            http.get("/model"),  # 401
            http.get("/no/such/path"),  # 404
            http.post("/similarity", headers=_bearer(KEY), files={"image1": ("a", b"x")}),  # 429 too
            http.get("/metrics"), http.get("/openapi.json"),
        ]
        assert [answer.status_code for answer in answers] == [200, 200, 200, 200, 200, 429, 401, 404, 429, 200, 200]
        for answer in answers:
            _assert_security_headers(answer)
        for docs in ("/docs", "/redoc"):
            page = http.get(docs)
            assert page.status_code == 200
            _assert_security_headers(page, with_csp=False)
            # Everything the documentation pages load comes from the service itself.
            assert not re.search(r'(src|href)="https?://', page.text), docs


def test_a_bad_request_gets_the_headers_and_the_policy_forbids_inline_code(client: httpx.Client) -> None:
    invalid = client.post("/similarity", files={"image1": ("a.png", encode(drawn_image(3), "PNG"))})
    assert invalid.status_code == 422
    _assert_security_headers(invalid)
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY, "nothing external"


class _InlineCode(HTMLParser):
    """Collects what a strict CSP would block in a page: inline scripts, styles and event handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style> element")
        self.found += [f"{name} attribute on <{tag}>" for name in names if name == "style" or name.startswith("on")]


def test_the_page_has_no_inline_script_or_style() -> None:
    parser = _InlineCode()
    parser.feed((STATIC_DIR / "index.html").read_text())
    assert parser.found == []
    # The detector itself works.
    probe = _InlineCode()
    probe.feed('<div style="color:red" onclick="x()"><script>1</script><style>p{}</style></div>')
    assert len(probe.found) == 4

