PRETRAINED_BY_MODEL_TYPE = {}
ChameleonCodec = DacCodec = EncodecCodec = MimiCodec = None
