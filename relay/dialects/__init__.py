"""API shapes other than OpenAI's chat — OpenAI's Responses API and Anthropic's Messages API — translated to a
chat request before the pipeline and back afterwards, with litellm's own translations (the ones the LiteLLM proxy
serves them with). So one pipeline serves all of them: keys, policies (which see chat's names for the sampling
parameters, whatever the client sent), quotas, the cache, routing, failover and the request log."""
