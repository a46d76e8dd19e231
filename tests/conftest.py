import os

# Triton reads TRITON_INTERPRET when kernels are defined, so set it before anything imports
# relsum_kernels.  On a CUDA machine the kernels compile for real instead.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def interpreter_mismatch() -> str | None:
    """Why this triton's CPU interpreter cannot run the kernels here, or None.

    Triton 3.6's interpreter loads a scalar as a one-element array and int()s it (loop bounds), which
    numpy 2.4 refuses; the kernels then die with "only 0-dimensional arrays can be converted".
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None

    def major_minor(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:2])

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s CPU interpreter needs numpy < 2.4 (found "
                f"{numpy.__version__}): pip install 'numpy<2.4', or triton>=3.7")
    return None


def pytest_configure(config):
    problem = interpreter_mismatch()
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared, busy CPU the OpenMP
    hand-offs of thousands of small ops cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def impl_device(impl: str) -> str:
    """Where a test's tensors live for ``impl``: Triton's device for "triton" (CUDA, or the CPU under
    the interpreter), the CPU for the torch paths."""
    return triton_device() if impl == "triton" else "cpu"


# ---------------------------------------------------------------------------------- tiny models
POLICY_WORDS = ("red blue cotton shirt size large small pack of two steel bottle water kids dog food "
                "chicken organic list the searchable attributes this product as a short comma-separated "
                "brand material quantity features compatibility at most tokens no sentences product "
                "type").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A random 2-layer Llama and a word-level tokenizer with a chat template, saved like a hub folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = sorted(set(POLICY_WORDS + ["user", "assistant", ":", ",", "."]))
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"], tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_policy")
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def minilm_dir(weights: bool = False):
    """The packaged all-MiniLM-L6-v2 folder; skips the test where it (or its weights) is missing."""
    from relsum_core.ranker import packaged_minilm_path

    try:
        path = packaged_minilm_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if weights and not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} has the tokenizer only, not the MiniLM weights")
    return path


@pytest.fixture(scope="session")
def tiny_ranker_dir(tmp_path_factory):
    """A tiny random 1-label BertForSequenceClassification with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)  # scores that differ visibly between pairs
    path = tmp_path_factory.mktemp("tiny_ranker")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random 2-layer BERT (no head) with MiniLM's tokenizer: train-ranker's code path in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from relsum_core.trainers.ranker import default_base

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(default_base())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
