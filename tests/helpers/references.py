"""Hand self-label a ready reference backend for a `ref_model` name: the stage loads each reference once per
process into `stages.self_label._REFERENCES`, so a scripted one put there is what the stage reads."""


def use_reference(name: str, backend, kind: str = "transformers") -> None:
    from stages import self_label

    self_label._REFERENCES[(kind, name)] = backend
