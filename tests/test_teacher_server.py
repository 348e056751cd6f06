"""The server teacher's HTTP client against a broken network, and its configuration checks.

The HTTP server here is stdlib `http.server` on 127.0.0.1 playing a network that fails —
it answers 503, drops connections, or sleeps past the client's timeout, on a script — not
vLLM: scoring against a real `vllm serve` is tests/test_vllm_server.py (the vLLM tier).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from protege.capabilities import config_problem
from protege.cli import run_example
from protege.config import load_config
from protege.errors import ProtegeError
from protege.teacher_server import ServerClient, ServerLimits, TeacherServerError

# timeout_s: long enough for a loaded CI machine to answer at once, short enough to wait out
FAST = ServerLimits(timeout_s=1.0, retries=2, concurrency=2, backoff_s=0.05)


class BrokenNetwork:
    """A local HTTP server that meets request i with `script[i]` (the last one repeats):
    an int status (its body `{"ok": true}` on 200), "drop" (close without answering) or
    "sleep" (answer only after the client's timeout). Records when each request arrived."""

    def __init__(self, script: list) -> None:
        self.script, self.arrivals = script, []
        network = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                network.answer(self)

            do_POST = do_GET

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        handler.rfile.read(length)
        self.arrivals.append(time.monotonic())
        action = self.script[min(len(self.arrivals), len(self.script)) - 1]
        if action == "drop":
            handler.close_connection = True
            return
        if action == "sleep":
            time.sleep(FAST.timeout_s * 3)
            action = 200
        body = {"ok": True} if action == 200 else {"error": {"message": f"scripted {action}"}}
        payload = json.dumps(body).encode()
        handler.send_response(action)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def network():
    made = []

    def make(script: list) -> BrokenNetwork:
        made.append(BrokenNetwork(script))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize("failure", [503, "drop", "sleep"])
def test_a_failing_request_is_retried_until_it_is_answered(network, failure):
    server = network([failure, failure, 200])
    client = ServerClient(server.url, "big", FAST)
    assert client.post("/v1/completions", {"prompt": [[1, 2]]}) == {"ok": True}
    assert len(server.arrivals) == 3 and client.retried == 2


@pytest.mark.parametrize(
    "failure,named",
    [(503, "HTTP 503: scripted 503"), ("drop", "RemoteProtocolError"), ("sleep", "ReadTimeout")],
)
def test_a_server_that_stops_answering_is_one_error_after_the_retries(network, failure, named):
    server = network([failure])
    client = ServerClient(server.url, "big", FAST)
    with pytest.raises(TeacherServerError) as error:
        client.post("/v1/completions", {"prompt": [[1, 2]]})
    assert len(server.arrivals) == FAST.retries + 1
    message = str(error.value)
    assert (
        f"teacher 'big': the server at {server.url} did not answer POST /v1/completions" in message
    )
    assert f"after {FAST.retries + 1} attempts" in message and named in message
    assert "teacher.timeout_s / teacher.retries" in message


def test_retries_back_off_exponentially(network):
    server = network([503, 503, 503, 200])
    ServerClient(server.url, "big", ServerLimits(retries=3, backoff_s=0.05)).get("/v1/models")
    gaps = [later - earlier for earlier, later in zip(server.arrivals, server.arrivals[1:])]
    for attempt, gap in enumerate(gaps):  # waits of 0.05, 0.1, 0.2 s at least
        assert gap >= FAST.backoff_s * 2**attempt * 0.9, gaps


def test_a_url_with_the_openai_v1_suffix_names_the_same_server(network):
    server = network([200])
    assert ServerClient(f"{server.url}/v1/", "big", FAST).url == server.url


def test_a_refused_request_is_not_retried_and_names_the_servers_reason(network):
    server = network([400])
    client = ServerClient(server.url, "big", FAST)
    with pytest.raises(
        TeacherServerError, match=r"refused POST /v1/completions \(HTTP 400\): scripted 400"
    ):
        client.post("/v1/completions", {"prompt": [[1, 2]]})
    assert len(server.arrivals) == 1 and client.retried == 0


def test_a_scorer_whose_server_stops_answering_fails_the_step_with_one_error(network):
    from protege.actors.server_teacher import ServerTeacherScorer
    from protege.records import RolloutBatch, RolloutPlan

    server = network([503])
    scorer = ServerTeacherScorer("big", url=server.url, limits=FAST, name="big")
    ids, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(TeacherServerError, match="teacher 'big': the server at .* did not answer"):
        scorer.score(RolloutBatch(ids, mask, ids, mask), RolloutPlan(teacher_need="sampled"))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


# -- the run's start-up checks -------------------------------------------------------------
LOCAL = ["trainer.workers=local", "logging.wandb=disabled", "logging.progress=false"]
BUILTIN_DATA = ["data.train=builtin:tiny/train", "data.test=builtin:tiny/test"]


def server_overrides(url: str) -> list[str]:
    return [
        "teacher.backend=server",
        f"teacher.url={url}",
        "teacher.model=big",
        "teacher.retries=1",
        "teacher.timeout_s=2.0",
    ]


def test_an_unreachable_server_stops_the_run_at_start_up_with_exit_code_2(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    overrides = [*LOCAL, *BUILTIN_DATA, *server_overrides(url), f"output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as done:
        run_example("gkd", overrides)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert (
        f"teacher 'teacher' (teacher.backend=server): no OpenAI-compatible server answers at {url}"
        in line
    )
    assert "ConnectError" in line and "vllm serve" in line


def problem(*overrides: str, preset: str = "gkd") -> str | None:
    config = load_config(preset, [*BUILTIN_DATA, *overrides])
    algorithm = config.build_algorithm()
    return config_problem(config, [algorithm.plan(k) for k in range(3)])


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["teacher.backend=server"], "teachers.0: teacher.backend=server scores with a running"),
        (["teacher.backend=server", "teacher.url=127.0.0.1:8000"], "must start with http://"),
        (
            ["teacher.url=http://127.0.0.1:8000"],
            "teachers.0.url is read only with teacher.backend=server",
        ),
        (
            ["teacher.backend=server", "teacher.url=http://h:1", "algorithm.teacher_output=full"],
            "does not return (it returns log-probs)",
        ),
        (
            ["teacher.backend=server", "teacher.url=http://h:1", "algorithm.temperature=2.0"],
            "log-probs at temperature 1",
        ),
    ],
)
def test_a_server_teacher_config_that_cannot_work_is_refused(overrides, expected):
    assert expected in (problem(*overrides) or "")


def test_a_server_teacher_cannot_steer_decoding():
    found = problem("teacher.backend=server", "teacher.url=http://h:1", preset="minillm")
    assert found is not None and "teachers.0 is on a server" in found


def test_a_server_teacher_config_that_can_work_passes():
    assert problem("teacher.backend=server", "teacher.url=http://127.0.0.1:8000") is None


def test_server_errors_are_protege_errors():
    assert issubclass(TeacherServerError, ProtegeError)  # printed as one block, exit code 2
