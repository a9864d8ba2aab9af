"""Generation stops at every end token the model declares, not only the tokenizer's EOS."""

from transformers import GenerationConfig

from potstill.toy.models import build_tiny_model
from teacher_service.backends.base import BackendConfig, GenerateItem, SamplingParams
from teacher_service.backends.hf import HFBackend

GREEDY = SamplingParams(n=1, max_tokens=8, temperature=0.0, top_p=1.0, seed=None, top_logprobs=0)


def test_a_declared_end_of_turn_token_ends_the_sample(tmp_path):
    path = build_tiny_model(tmp_path / "model", seed=3)
    backend = HFBackend.load(BackendConfig(model=str(path)))
    prompt = backend.encode("12+34=")
    free = backend.generate_now([GenerateItem(prompt, GREEDY)])[0].samples[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    end_of_turn = int(free.token_ids[0])  # pretend the model declares its first greedy token as end of turn
    assert end_of_turn != backend.tokenizer.eos_token_id
    generation = GenerationConfig(eos_token_id=[backend.tokenizer.eos_token_id, end_of_turn])
    generation.save_pretrained(path)

    stopped = HFBackend.load(BackendConfig(model=str(path))).generate_now([GenerateItem(prompt, GREEDY)])[0].samples[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids.tolist() == [end_of_turn]
