"""The OSD serving loop (component tier): buffer records, draft updates that never stop
serving, and bad input as one clear error. Real tiny models, no Ray."""

from __future__ import annotations

import json
import time

import pytest
import torch

from protege.config import ConfigError
from protege.data import DataError
from protege.errors import SetupError
from protege.launch import LocalHandle, LocalLauncher, Resources
from protege.metrics_log import MetricsLog
from protege.osd.buffer import DistillBuffer
from protege.osd.config import load_osd_config
from protege.osd.distiller import DraftDistiller
from protege.osd.loop import OSDLoop
from protege.osd.records import DistillRecords, Request
from protege.osd.run import main, run, traffic
from protege.osd.server import OSDServer


def small_config(tmp_path, *overrides: str):
    return load_osd_config(
        "osd",
        [
            "workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={tmp_path}",
            "serving.num_requests=24",
            "buffer.min_records=6",
            "distill.steps_per_update=2",
            "eval.heldout_size=8",
            "eval.every=8",
            *overrides,
        ],
    )


def fake_records(n: int, vocab: int = 5, width: int = 3) -> DistillRecords:
    logp = torch.log_softmax(torch.randn(n, vocab), -1)
    return DistillRecords(
        prefix_ids=torch.ones(n, width, dtype=torch.long),
        prefix_mask=torch.ones(n, width, dtype=torch.bool),
        token_ids=torch.arange(n) % vocab,
        draft_logprobs=logp,
        target_logprobs=logp.flip(-1),
        rejected=torch.ones(n, dtype=torch.bool),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_buffer_size_and_age_thresholds_and_capacity_bound():
    clock = Clock()
    buffer = DistillBuffer(capacity=10, min_records=6, max_age_s=5.0, clock=clock)
    buffer.add(fake_records(4))
    assert buffer.size == 4 and not buffer.ready()
    clock.now = 5.0  # the oldest record is now 5 s old
    assert buffer.ready()
    clock.now = 1.0
    buffer.add(fake_records(3, width=5))
    assert buffer.ready()  # 7 >= 6 records
    buffer.add(fake_records(6))
    assert (buffer.size, buffer.dropped) == (10, 3)  # the oldest three went
    drained = buffer.drain()
    assert drained.size == 10 and buffer.size == 0 and buffer.drained == 10
    assert drained.prefix_ids.shape == (10, 5)
    assert drained.prefix_mask.sum(-1).tolist() == [3] + [5] * 3 + [3] * 6  # left-padded
    assert buffer.drain() is None and not buffer.ready()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = small_config(tmp_path_factory.mktemp("osd"), "buffer.positions=all")
    return OSDServer(config)


def test_records_hold_both_models_distributions_at_their_prefixes(server):
    """Every record's target (draft) distribution is the target's (draft's) own next-token
    distribution after its prefix, recomputed here with a plain forward."""
    served = server.serve(Request(0, "67+85="))
    records = served.records
    assert records is not None and records.size == served.verified
    assert records.rejected.sum() == served.verified - served.accepted
    for row in range(records.size):
        prefix = records.prefix_ids[row][records.prefix_mask[row]][None]
        with torch.no_grad():
            target = torch.log_softmax(server.target(input_ids=prefix).logits[0, -1], -1)
            draft = torch.log_softmax(server.sampler.model(input_ids=prefix).logits[0, -1], -1)
        assert torch.allclose(records.target_logprobs[row], target, atol=1e-5)
        assert torch.allclose(records.draft_logprobs[row], draft, atol=1e-5)
    batch = records.to_batch()
    assert batch.teacher_logits.shape == (records.size, 1, records.target_logprobs.shape[-1])


def test_rejected_only_and_topk_payload(tmp_path):
    config = small_config(tmp_path, "buffer.payload=topk", "buffer.topk=4")
    server = OSDServer(config)
    served = server.serve(Request(0, "67+85="))
    records = served.records
    assert records.size == served.verified - served.accepted > 0
    assert bool(records.rejected.all())
    assert records.support_ids.shape == (records.size, 4)
    assert torch.allclose(records.target_logprobs.exp().sum(-1), torch.ones(records.size))
    assert torch.allclose(records.draft_logprobs.exp().sum(-1), torch.ones(records.size))
    batch = records.to_batch()
    assert batch.teacher_topk_ids.shape == (records.size, 1, 4)


def test_an_update_moves_the_draft_toward_the_target(tmp_path, server):
    """The distiller's new weights, loaded into the server, lower the held-out KL."""
    config = small_config(tmp_path, "buffer.positions=all", "distill.steps_per_update=8")
    fresh = OSDServer(config)
    fresh.prepare_heldout([f"{a}+{a + 7}=" for a in range(50, 58)])
    before = fresh.heldout_kl()
    parts = [fresh.serve(Request(i, f"{60 + i}+{70 + i}=")).records for i in range(8)]
    from protege.osd.records import concat_records

    result = DraftDistiller(config, master_port=_port()).update(concat_records(parts))
    assert result.metrics["distill/loss_last"] < result.metrics["distill/loss_first"]
    fresh.load_weights(result.update)
    assert fresh.version == result.update.version == 8
    assert fresh.heldout_kl() < before


def _port() -> int:
    from protege.run import free_port

    return free_port()


class GatedDistiller(DraftDistiller):
    """The real distiller, made to hold each update until the loop has served `hold` more
    requests (or all of them): if serving waited on the update, it would never get there."""

    hold = 5

    def __init__(self, config, master_port):
        super().__init__(config, master_port)
        self.timeline: list = []

    def _served(self) -> int:
        return len([e for e in self.timeline if e.kind == "served"])

    def update(self, records):
        goal = min(self._served() + self.hold, self.config.serving.num_requests)
        deadline = time.monotonic() + 60
        while self._served() < goal:
            if time.monotonic() > deadline:
                raise AssertionError("serving stopped while a draft update was in flight")
            time.sleep(0.005)
        return super().update(records)


def test_updates_never_stop_serving_beyond_one_weight_load(tmp_path):
    """Requests keep being served while each update trains; the draft version changes only
    at a `loaded` event, between two requests, and takes effect on the next request."""
    config = small_config(tmp_path, "serving.num_requests=40")
    launcher = LocalLauncher(threads=True)
    server = launcher.spawn("osd-server", OSDServer, [Resources()], [(config,)])[0]
    gated = GatedDistiller(config, _port())
    loop = OSDLoop(
        config,
        launcher,
        server,
        LocalHandle(gated, threaded=True),
        traffic(config),
        MetricsLog(config),
    )
    gated.timeline = loop.timeline
    loop.run()
    events = loop.timeline
    served = [e for e in events if e.kind == "served"]
    assert [e.value for e in served] == list(range(40))  # every request, in order
    submitted = [e for e in events if e.kind == "submitted"]
    loaded = [e for e in events if e.kind == "loaded"]
    assert len(loaded) >= 2
    for sent, landed in zip(submitted, loaded):
        assert landed.requests >= sent.requests + GatedDistiller.hold
    version = 0
    for event in events:
        if event.kind == "loaded":
            assert event.version > version
            version = event.version
        elif event.kind == "served":
            assert event.version == version  # served by the last draft loaded, no other
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["osd/updates"] == len(loaded)


def test_requests_are_replayed_at_the_configured_rate(tmp_path, server):
    """Arrivals i / rate: the loop sleeps until each one (a clock that only sleeping moves
    makes the sleeps exact), and latency counts from the arrival."""
    config = small_config(tmp_path, "serving.rate=4", "serving.num_requests=3")
    clock = Clock()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    launcher = LocalLauncher()
    loop = OSDLoop(
        config,
        launcher,
        LocalHandle(server),
        None,
        traffic(config),
        MetricsLog(config),
        clock=clock,
        sleep=sleep,
    )
    totals = loop.run()
    assert sleeps == [0.25, 0.25]  # the first request arrives at once
    assert totals["total/requests"] == 3 and totals["total/latency_p95_ms"] == 0.0


def test_sampling_with_topk_payload_and_jsd_distils(tmp_path):
    """Speculative sampling, top-k + tail records and JSD(β) through the learner, end to end."""
    config = small_config(
        tmp_path,
        "serving.temperature=1.0",
        "buffer.payload=topk",
        "buffer.topk=4",
        "distill.divergence=jsd",
        "distill.beta=0.5",
        "serving.num_requests=16",
    )
    totals = run(config)["totals"]
    assert totals["total/updates"] >= 1 and totals["total/records_distilled"] >= 6
    assert 0 < totals["total/acceptance_rate"] < 1


def test_static_draft_run_writes_metrics_and_summary(tmp_path):
    summary = run(small_config(tmp_path, "distill.enabled=false", "serving.num_requests=8"))
    totals = summary["totals"]
    assert totals["total/updates"] == 0 and totals["total/requests"] == 8
    assert 0 <= totals["total/acceptance_rate"] <= 1
    assert totals["total/heldout_kl_first"] == totals["total/heldout_kl_last"]
    assert json.loads((tmp_path / "summary.json").read_text())["totals"] == totals
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"osd/latency_p95_ms", "osd/tokens_per_s", "osd/buffer_size"} <= set(row)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (["serving.k=-1"], ConfigError, "serving.k"),
        (["buffer.positon=all"], ConfigError, "did you mean 'positions'"),
        (["distill.beta=0.3"], ConfigError, "distill.divergence=jsd"),
        (["serving.traffic=/nonexistent.jsonl"], DataError, "no such data file"),
        (["draft.model=/nonexistent"], SetupError, "draft.model"),
        (["serving.k=0"], SetupError, "serving.k >= 1"),
        (["serving.max_new_tokens=64"], SetupError, "serving.max_new_tokens"),
        (["learner.num_workers=2"], SetupError, "learner.num_workers=1"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, overrides, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        run(small_config(tmp_path, *overrides))


def test_the_preset_loads_by_name_and_by_path():
    from protege.config import CONFIG_DIR

    by_name = load_osd_config("osd")
    assert by_name == load_osd_config(CONFIG_DIR / "osd.yaml")
    assert by_name.learner_config().build_algorithm().name == "gkd"
    assert load_osd_config("osd", ["distill.divergence=reverse_kl"]).divergence_beta == 1.0


def test_cli_prints_one_error_block_and_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main("osd", [f"output_dir={tmp_path}", "serving.rate=-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config") and "serving.rate" in err
    assert "Traceback" not in err


def test_plot_writes_a_png_or_a_plain_svg(tmp_path):
    from xml.etree import ElementTree

    from protege.osd import plot

    curves = {"static": [(25.0, 0.3), (50.0, 0.3)], "online": [(25.0, 0.3), (50.0, 0.6)]}
    written = plot.plot_acceptance(curves, [20, 40], tmp_path / "a.png", "t")
    assert written.stat().st_size > 0
    svg = plot._svg(curves, [20, 40], tmp_path / "a.svg", "t & u")  # the no-matplotlib path
    root = ElementTree.parse(svg).getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 3  # axes + 2 curves
