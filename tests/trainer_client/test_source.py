"""The live pool is a `TeacherSource` and its groups are `TeacherInfo`s, so methods can take any source."""

from teacher_service.protocol import ModelInfo
from trainer_client.pool import TeacherGroup, TeacherPool
from trainer_client.source import TeacherInfo, TeacherSource


class NotASource:
    def groups(self, tag=None):
        return []


def test_pool_and_its_groups_implement_the_protocols():
    info = ModelInfo(model="m", backend="hf", vocab_size=10, max_model_len=8, max_top_logprobs=5, max_samples=2,
                     max_new_tokens=4, tokenizer_fingerprint="f", eos_token_id=1, max_batch=4)
    group = TeacherGroup(name="m", tags=("math",), weight=1.0, info=info)
    pool = TeacherPool([group])
    assert isinstance(pool, TeacherSource)
    assert isinstance(group, TeacherInfo)
    assert pool.groups("math") == [group] and pool.groups("code") == []
    assert not isinstance(NotASource(), TeacherSource)
