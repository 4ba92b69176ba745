# The types of p2pfm/__init__.py's names, which it loads lazily (on first use).
from p2pfm.learn.array_learner import ArrayLearner as ArrayLearner
from p2pfm.learn.learner import Learner as Learner
from p2pfm.simulation import Attack as Attack
from p2pfm.simulation import Crash as Crash
from p2pfm.simulation import Drop as Drop
from p2pfm.simulation import NodeReport as NodeReport
from p2pfm.simulation import RoundResult as RoundResult
from p2pfm.simulation import SimulationResult as SimulationResult
from p2pfm.simulation import Slow as Slow
from p2pfm.simulation import simulate as simulate

__version__: str
__all__: list[str]
