"""A loss setting that only some losses read is refused at load when it is set (away from its default) in a config
where nothing reads it: simpo_gamma under sigmoid DPO would otherwise be ignored without a word. Defaults, and a
default given explicitly (a config written back in full), still load."""
import pytest
from pydantic import ValidationError

from pipeline.train.losses import ListLossConfig, LossConfig
from pipeline.train.losses.types import LIST_SETTING_READERS, PAIR_SETTING_READERS
from tests.test_config_load import _assert_refused, _cli, _config, _files

# field -> (a value other than the default, a config where nothing reads it, a config that reads it, the readers
# the error names)
PAIR_CASES = {
    "label_smoothing": (0.1, {"loss_type": "ipo"}, {"loss_type": "robust"},
                        "loss_type sigmoid / exo_pair / robust / aot / aot_unpaired / simpo"),
    "use_label_confidence": (True, {"loss_type": "hinge"}, {}, "loss_type sigmoid"),
    "f_alpha_divergence_coef": (0.3, {"f_divergence_type": "js_divergence"},
                                {"f_divergence_type": "alpha_divergence"}, "f_divergence_type alpha_divergence"),
    "discopop_tau": (0.2, {}, {"loss_type": "discopop"}, "loss_type discopop"),
    "simpo_gamma": (1.0, {"loss_type": "sigmoid"}, {"loss_type": ["sigmoid", "simpo"]}, "loss_type simpo"),
    "ln_dpo_beta": (3.0, {"loss_type": "sigmoid_norm"}, {"loss_type": "ln_dpo"}, "loss_type ln_dpo"),
    "rpo_form": ("cumulative", {}, {"rpo_alpha": 1.0}, "rpo_alpha"),
    "nll_average": ("sequence", {"rpo_alpha": 1.0, "rpo_form": "cumulative"}, {"loss_type": "orpo"},
                    "loss_type sft / orpo or rpo_alpha with rpo_form average"),
    "bco_baseline": ("none", {}, {"loss_type": "bco_pair"}, "loss_type bco_pair"),
    "rationale_form": ("nll", {}, {"rationale_gamma": 0.1}, "rationale_gamma"),
    "spa_refine_strength": (0.3, {}, {"loss_type": "distill"}, "loss_type distill"),
    "spa_warmup_fraction": (0.0, {}, {"loss_type": "distill"}, "loss_type distill"),
    "spa_window": (10, {}, {"loss_type": "distill"}, "loss_type distill"),
    "spa_threshold_quantile": (0.3, {}, {"loss_type": "distill"}, "loss_type distill"),
    "lcpo_init_noise": (0.2, {}, {"lcpo_mode": "em_full"}, "lcpo_mode"),
    "lcpo_momentum": (0.5, {}, {"lcpo_mode": "weight_only"}, "lcpo_mode"),
}
LIST_CASES = {
    "length_normalize": (True, {"loss_type": "tpo"}, {"loss_type": "lipo_lambda"},
                         "loss_type plackett_luce / lipo_lambda"),
    "lambda_weighting": ("uniform", {"loss_type": "plackett_luce"}, {"loss_type": "tpo"},
                         "loss_type lipo_lambda / tpo"),
    "discount_log_base": (10.0, {"loss_type": "lipo_lambda", "lambda_weighting": "uniform"},
                          {"loss_type": "lipo_lambda"}, "loss_type lipo_lambda / tpo with lambda_weighting lambda"),
    "pro_reward_temperature": (False, {"loss_type": "lipo_lambda"}, {"loss_type": "pro"}, "loss_type pro"),
    "pro_sft_weight": (0.0, {}, {"loss_type": "pro"}, "loss_type pro"),
    "tpo_label_range": ((0.0, 1.0), {"loss_type": "plackett_luce"}, {"loss_type": "tpo"}, "loss_type tpo"),
}
CASES = {**{("loss", k): v for k, v in PAIR_CASES.items()}, **{("list_loss", k): v for k, v in LIST_CASES.items()}}
MODELS = {"loss": LossConfig, "list_loss": ListLossConfig}


def test_every_guarded_setting_has_a_case():
    assert set(PAIR_CASES) == set(PAIR_SETTING_READERS) and set(LIST_CASES) == set(LIST_SETTING_READERS)
    for (section, field), (value, *_rest) in CASES.items():
        assert value != MODELS[section].model_fields[field].default, field  # the case really sets something


@pytest.mark.parametrize("section, field", sorted(CASES))
def test_a_setting_nothing_reads_is_refused(section, field):
    value, unread, _, readers = CASES[section, field]
    with pytest.raises(ValidationError) as e:
        MODELS[section](**unread, **{field: value})
    (err,) = e.value.errors()
    assert err["loc"] == (field,)
    assert f"{field}={value!r} would be ignored: only {readers} read(s) it" in err["msg"]


@pytest.mark.parametrize("section, field", sorted(CASES))
def test_a_setting_that_is_read_loads(section, field):
    value, _, reads, _ = CASES[section, field]
    cfg = MODELS[section](**reads, **{field: value})
    assert getattr(cfg, field) == value


@pytest.mark.parametrize("section, field", sorted(CASES))
def test_defaults_and_a_full_dump_load_where_nothing_reads_them(section, field):
    _, unread, _, _ = CASES[section, field]
    model = MODELS[section]
    cfg = model(**unread)  # the default of `field` is never refused
    again = model(**cfg.model_dump())  # every field given, each at its default or at what `unread` set
    assert again == cfg and field in again.model_fields_set


def test_train_refuses_it_with_exit_2_naming_file_and_key(tmp_path, monkeypatch, capsys):
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d\nloss: {loss_type: sigmoid, simpo_gamma: 1.0}\n")
    code, err = _cli(["train", path, "-o", tmp_path / "out"], monkeypatch, capsys)
    _assert_refused(code, err, path, "loss.simpo_gamma", "only loss_type simpo read(s) it")
    assert _files(tmp_path) == {"train.yaml"}


def test_train_option_on_the_command_line_is_refused_too(tmp_path, monkeypatch, capsys):
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d\nloss: {loss_type: ipo}\n")
    code, err = _cli(["train", path, "-o", tmp_path / "out", "--loss.simpo-gamma", "1.0"], monkeypatch, capsys)
    _assert_refused(code, err, path, "loss.simpo_gamma", "this config has loss_type 'ipo'")
    assert _files(tmp_path) == {"train.yaml"}


def test_run_config_load_refuses_it_in_an_arm(tmp_path, monkeypatch, capsys):
    path = _config(tmp_path, lambda c: c["train"][1]["config"]["loss"].update(rpo_form="cumulative",
                                                                             nll_average="sequence"))
    before = _files(tmp_path)
    code, err = _cli(["run", path], monkeypatch, capsys)
    _assert_refused(code, err, path, "train.1.config.loss.nll_average", "only loss_type sft / orpo or rpo_alpha "
                    "with rpo_form average read(s) it, and this config has loss_type 'sigmoid', rpo_alpha 1.0, "
                    "rpo_form 'cumulative'")
    assert _files(tmp_path) == before



def test_label_smoothing_beside_label_confidence_on_sigmoid_alone_is_refused():
    # use_label_confidence replaces label_smoothing with 1 - confidence for sigmoid; another loss still reads it
    with pytest.raises(ValidationError, match=r"label_smoothing=0.1 would be ignored: use_label_confidence "
                                              r"replaces it for sigmoid"):
        LossConfig(use_label_confidence=True, label_smoothing=0.1)
    assert LossConfig(loss_type=["sigmoid", "robust"], use_label_confidence=True, label_smoothing=0.1)
    assert LossConfig(use_label_confidence=True, label_smoothing=0.0)
