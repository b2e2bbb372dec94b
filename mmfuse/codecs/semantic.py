SemanticAudioCodec = pretrain_semantic_audio = None
