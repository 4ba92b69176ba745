"""The model-free learner the simulator and tests run the node loop with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from p2pfm.core.errors import LocalProtocolError
from p2pfm.learn.learner import Learner, QuadraticLearner, quadratic_problem


def test_quadratic_learner_descends_to_its_centre_and_resumes_exactly(tmp_path: Path) -> None:
    centres, optimum = quadratic_problem(3, 8, seed=1)
    np.testing.assert_allclose(optimum, np.mean(centres, axis=0), rtol=1e-6)
    learner: Learner = QuadraticLearner(centres[0], optimum, lr=0.5, noise=0.1, start=np.zeros(8), seed=2)
    first = learner.train_steps(1)
    later = learner.train_steps(20)
    assert first is not None and later is not None and later < first
    assert learner.train_steps(0) is None
    twin = QuadraticLearner(centres[0], optimum, lr=0.5, noise=0.1, seed=9)
    twin.set_state(learner.get_state())
    twin.load_state_dict(learner.state_dict())
    learner.train_steps(3)
    twin.train_steps(3)
    np.testing.assert_array_equal(learner.get_state()["x"], twin.get_state()["x"])  # same noise draws
    learner.save(tmp_path / "out")
    saved = safetensors.numpy.load_file(str(tmp_path / "out" / "state.safetensors"))
    np.testing.assert_array_equal(saved["x"], learner.get_state()["x"])
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700


def test_quadratic_learner_refuses_bad_input() -> None:
    centres, optimum = quadratic_problem(2, 4)
    learner = QuadraticLearner(centres[0], optimum)
    assert learner.evaluate()["distance"] > 0
    learner.set_state({"x": optimum})
    assert learner.evaluate()["distance"] == pytest.approx(0.0, abs=1e-7)
    for bad in (np.zeros(5, np.float32), np.array([np.nan, 0, 0, 0], np.float32)):
        with pytest.raises(LocalProtocolError):
            learner.set_state({"x": bad})
    with pytest.raises(LocalProtocolError):
        QuadraticLearner(centres[0], optimum, lr=0.0)
    with pytest.raises(LocalProtocolError):
        quadratic_problem(0, 4)
