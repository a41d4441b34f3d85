-- Argo CD health check for juturna.io/Pipeline.
-- Progressing: the operator has not yet described this generation, or a step is under way.
-- Healthy:     the desired state is reached, including Ready (a warm standby) and Stopped.
-- Degraded:    the last attempt failed; the message says why.
local hs = {}
local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the juturna-operator to see this Pipeline"
  return hs
end
if status.failure ~= nil then
  hs.status = "Degraded"
  hs.message = status.failure.reason .. ": " .. status.failure.message
  return hs
end
if status.observedGeneration == nil or status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the juturna-operator to act on generation " .. obj.metadata.generation
  return hs
end
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      if condition.status == "True" then
        hs.status = "Healthy"
      else
        hs.status = "Progressing"
      end
      hs.message = condition.message
      return hs
    end
  end
end
hs.status = "Progressing"
hs.message = "Phase " .. (status.phase or "unknown")
return hs
