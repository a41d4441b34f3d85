-- Argo CD health check for juturna.io/Pipeline (Lua 5.1, as gopher-lua runs it).
-- Progressing: the operator has not yet described this generation, or a step is under way.
-- Healthy:     the desired state is reached, including Standby (a warm standby) and Stopped.
-- Degraded:    the last attempt at this generation failed; the message says why.
local hs = {}
local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the juturna-operator to see this Pipeline"
  return hs
end
-- Generation first: a status about an older generation (a failure included) says nothing
-- about the spec Argo CD just applied; Degraded here would fail a sync with waves.
local generation = obj.metadata.generation
if generation ~= nil then
  local observed = status.observedGeneration
  if observed == nil or observed < generation then
    hs.status = "Progressing"
    hs.message = "Waiting for the juturna-operator to observe generation " .. generation
    if observed ~= nil then
      hs.message = hs.message .. " (the status describes generation " .. observed .. ")"
    end
    return hs
  end
end
if status.failure ~= nil then
  hs.status = "Degraded"
  hs.message = status.failure.reason or "Failed"
  -- Argo CD reads an absent message as an empty one: neither adds a dangling ": ".
  if status.failure.message ~= nil and status.failure.message ~= "" then
    hs.message = hs.message .. ": " .. status.failure.message
  end
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
