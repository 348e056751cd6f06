"""Slow tier: a Ray learner hands out its live weights uncopied (`export_weights(snapshot=
False)`, what the pipeline asks of a serializing launcher), and each export still holds the
weights of its own version, though the learner trains on at once."""

from __future__ import annotations

import pytest
import ray
import torch

from protege.actors.learner import Learner
from protege.actors.ray_actors import RayLauncher
from protege.launch import Resources
from protege.modeling import load_model
from tests.test_learner import make_batch, make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_instance")]


def test_an_uncopied_ray_export_holds_the_weights_of_its_version(tiny_dirs):
    config = make_config(tiny_dirs)
    batch = make_batch(tiny_dirs)
    [remote] = RayLauncher().spawn("learner", Learner, [Resources(0.5, 0)], [(config,)])
    ray.get(remote.train.remote(batch))
    first = remote.export_weights.remote(snapshot=False)
    version = remote.weights_version.remote()
    ray.get(remote.train.remote(batch))  # queued behind the export: the live weights move on
    second = remote.export_weights.remote(snapshot=False)
    first, second = ray.get([first, second])
    assert (first.version, ray.get(version), second.version) == (1, 1, 2)

    local = Learner(config)  # the same step in this process: the weights of version 1
    local.train(batch)
    expected = local.export_weights().tensors
    assert all(torch.equal(first.tensors[k], v) for k, v in expected.items())
    assert not all(torch.equal(second.tensors[k], v) for k, v in expected.items())
    fresh = load_model(tiny_dirs["student"])
    fresh.load_state_dict(first.tensors, strict=True)  # read-only shared memory loads
    ray.kill(remote)
