-- CoCoNot taxonomy (paper Fig. 3): each SAE feature with each CoCoNot (category, subcategory) on whose
-- prompts it is non-zero. Only the prompt's own tokens count (role user, and post_instruction: the
-- template tail after the user text, which reads it); not the first token (massive activations) nor the
-- template before the user text, which every prompt shares. Unablated items of complete runs only.
WITH prompt_rows AS (
    SELECT t.run_id, t.row, t.prompt_id,
           split_part(p.category, '/', 1) AS category,
           substr(p.category, length(split_part(p.category, '/', 1)) + 2) AS subcategory
    FROM tokens t
    JOIN prompts p ON p.prompt_id = t.prompt_id
    JOIN items i ON i.run_id = t.run_id AND i.item = t.item
    JOIN interventions s ON s.spec_hash = i.spec_hash
    WHERE p.dataset = 'coconot' AND s.spec = '{}' AND t.role IN ('user', 'post_instruction')
)
SELECT a.layer, a.feature, r.category, r.subcategory,
       count(DISTINCT r.prompt_id) AS n_prompts, max(a.value) AS max_value
FROM sae_acts a
JOIN prompt_rows r ON r.run_id = a.run_id AND r.row = a.row
GROUP BY a.layer, a.feature, r.category, r.subcategory
ORDER BY a.layer, a.feature, r.category, r.subcategory;
