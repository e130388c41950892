"""Every generator a run draws from is in its checkpoint and comes back on resume (the kill-and-resume tests
in tests/test_reliability.py prove the whole run exact on CPU ranks; these cover each generator, and the
accelerator's through a stand-in device module, since this machine has no GPU)."""

from __future__ import annotations

import random

import numpy
import torch

from tropd_ds import checkpoint


def draws():
    return (torch.rand(3).tolist(), random.random(), numpy.random.rand())


def test_cpu_python_and_numpy_generators_are_saved_and_restored(tmp_path):
    torch.manual_seed(1), random.seed(1), numpy.random.seed(1)
    draws()
    torch.save(checkpoint.rng_states(), tmp_path / "rng.pt")
    expected = draws()
    draws()  # the run goes on (or dies) after its checkpoint
    checkpoint.restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


class FakeDevice:
    """A device module's RNG interface (torch.cuda.get_rng_state / set_rng_state), per device index."""

    def __init__(self):
        self.states = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([7], dtype=torch.uint8)}

    def get_rng_state(self, index):
        return self.states[index].clone()

    def set_rng_state(self, state, index):
        self.states[index] = state.clone()


def test_the_accelerators_generator_is_saved_and_restored(monkeypatch, tmp_path):
    device = FakeDevice()
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: ("cuda", device, 1))
    torch.save(checkpoint.rng_states(), tmp_path / "rng.pt")
    device.states[1] = torch.tensor([99], dtype=torch.uint8)  # the rollout drew from the GPU generator
    notes = []
    checkpoint.restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True), notes.append)
    assert device.states[1].tolist() == [7] and device.states[0].tolist() == [1] and not notes


def test_a_checkpoint_from_another_kind_of_device_restores_what_it_can_and_says_so(monkeypatch, tmp_path):
    device = FakeDevice()
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: ("cuda", device, 0))
    saved = checkpoint.rng_states()
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: None)
    notes = []
    torch.manual_seed(5)
    checkpoint.restore_rng_states(saved, notes.append)
    assert len(notes) == 1 and "from a cuda run" in notes[0] and "on cpu" in notes[0]
    assert torch.equal(torch.get_rng_state(), saved["torch"])


def test_a_checkpoint_from_before_the_accelerator_state_is_said_to_predate_it(monkeypatch):
    old = {"torch": torch.get_rng_state(), "python": random.getstate()}  # what earlier versions saved
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: ("cuda", FakeDevice(), 0))
    notes = []
    checkpoint.restore_rng_states(old, notes.append)
    assert len(notes) == 1 and "predates saving the cuda generator" in notes[0]
