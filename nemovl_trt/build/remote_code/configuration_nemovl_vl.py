"""Hugging Face config class for `NemotronH_Nano_VL_V2` checkpoints written by nemovl-trt.

TensorRT-LLM loads a checkpoint's config with `transformers.AutoConfig.from_pretrained(dir,
trust_remote_code=True)`; `NemotronH_Nano_VL_V2` is not a model type transformers knows, so the config
must name a config class through `auto_map`. Checkpoints from Hugging Face carry the model authors' own
`configuration.py`; checkpoints nemovl-trt makes itself (`make-checkpoint`, `train-tiny`) get this file,
copied into the LLM bundle by `nemovl-build engines` with `auto_map = {"AutoConfig":
"configuration_nemovl_vl.NemovlNanoVLConfig"}`. It only holds values: `llm_config` becomes the
transformers `nemotron_h` config, `vision_config` a plain config with the RADIO fields.
Self-contained on purpose (it runs from the bundle directory, without nemovl_trt installed).
"""

from transformers import AutoConfig, PretrainedConfig

LLM_MODEL_TYPE = "nemotron_h"


class NemovlNanoVLConfig(PretrainedConfig):
    """Top-level config: vision/projector fields as attributes, `llm_config` and `vision_config` as
    sub-configs."""

    model_type = "NemotronH_Nano_VL_V2"

    def __init__(self, llm_config=None, vision_config=None, **kwargs):
        super().__init__(**kwargs)
        llm = llm_config.to_dict() if isinstance(llm_config, PretrainedConfig) else dict(llm_config or {})
        llm.pop("model_type", None)
        self.llm_config = AutoConfig.for_model(LLM_MODEL_TYPE, **llm)
        vis = vision_config.to_dict() if isinstance(vision_config, PretrainedConfig) else dict(vision_config or {})
        self.vision_config = PretrainedConfig(**vis)

    def to_dict(self):
        out = super().to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        return out
