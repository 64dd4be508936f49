"""The inference engine: Sequence / BlockManager / Scheduler / ModelRunner / LLMEngine, the
sampler, speculative drafters, and the `LLM` / `SamplingParams` API."""

from hwattn.engine.block_manager import BlockManager
from hwattn.engine.llm import LLM, create_engine
from hwattn.engine.config import EngineConfig
from hwattn.engine.llm_engine import LLMEngine
from hwattn.engine.model_runner import ModelRunner, StepInput
from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.scheduler import Scheduler
from hwattn.engine.sequence import RequestOutput, Sequence

__all__ = ["BlockManager", "EngineConfig", "LLM", "LLMEngine", "ModelRunner", "RequestOutput",
           "SamplingParams", "Scheduler", "Sequence", "StepInput", "create_engine"]
