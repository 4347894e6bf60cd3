"""Build ``alignkit/demo/instructions.jsonl``, the embedded demo instruction set.

Every record is an Alpaca record with a verifiable constraint::

    {"instruction": "Explain what a rainbow is. Answer in at most 25 words.",
     "input": "", "output": "...", "constraint": {"type": "max_words", "n": 25},
     "split": "train", "slice": "demo_phrasing"}

The topic texts below were written for alignkit. Each topic has a task, an optional input text, a
short answer, a few one-line facts (for bullet answers) and a keyword that the answer uses. Each
topic is crossed with the six constraint types of :mod:`alignkit.oracle`, and the plain-words
constraint sentence comes from :func:`alignkit.oracle.describe_constraint`, so
:func:`alignkit.oracle.find_constraint` can read it back.

``split`` holds whole topics out (:func:`split_of`): training and annotation read ``train``, every
choice of settings reads ``validation``, and only the final evaluation reads ``test``. Each test
topic appears twice: in the demo's phrasings (``slice: demo_phrasing``) and in phrasings that no
training or validation prompt uses (``slice: heldout_phrasing``,
:data:`alignkit.oracle.HELDOUT_TEMPLATES`). The build is deterministic and checks that every
reference output passes its own constraint.

Usage::

    python -m alignkit.demo.make_demo            # rewrite the .jsonl next to this file
    python -m alignkit.demo.make_demo --check    # exit 1 if the committed file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    from alignkit.oracle import count_words, describe_constraint, find_constraint, passes
except ImportError:  # run as a plain script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from alignkit.oracle import count_words, describe_constraint, find_constraint, passes

OUT_PATH = Path(__file__).with_name("instructions.jsonl")

TYPES = ["max_words", "lowercase", "bullets", "starts_with", "ends_with", "include_keyword"]
WORD_LIMITS = [15, 20, 25, 30, 35, 40]
BULLET_COUNTS = [3, 2, 4, 3]
START_PHRASES = ["Sure!", "Great question!", "Here is a short answer:", "Happy to help.", "Good question."]
END_PHRASES = ["Hope this helps!", "Let me know if you have any questions.", "Thanks for asking.",
               "I hope that is useful.", "Is there anything else you would like to know?"]


@dataclass(frozen=True)
class Topic:
    area: str
    task: str
    answer: str
    facts: tuple[str, ...]
    keyword: str
    input: str = ""
    omit: str | None = None  # a constraint type that does not suit this topic


T = Topic
TOPICS: list[Topic] = [
    # ---- science
    T("science", "Explain what a rainbow is.",
      "A rainbow is an arc of colors that appears when sunlight is bent and reflected inside raindrops, "
      "splitting white light into its separate colors.",
      ("Sunlight enters raindrops and bends.", "Each drop splits white light into colors.",
       "Light reflects off the back of the drop.", "You see it with the sun behind you."),
      "sunlight"),
    T("science", "Why is the sky blue?",
      "The sky looks blue because air molecules scatter the short blue wavelengths of sunlight much more "
      "than red ones, spreading blue light across the sky.",
      ("Sunlight contains all colors.", "Air molecules scatter short wavelengths the most.",
       "Scattered blue light reaches us from every direction.", "At sunset, the longer path leaves reds and oranges."),
      "scatter"),
    T("science", "Describe how photosynthesis works.",
      "Plants use energy from light to turn water and carbon dioxide into sugar, releasing oxygen as a "
      "by-product. This happens mainly in their leaves.",
      ("It takes place in the chloroplasts of leaves.", "Light provides the energy.",
       "Water and carbon dioxide are the inputs.", "Sugar and oxygen are the outputs."),
      "oxygen"),
    T("science", "What causes the seasons on Earth?",
      "Seasons happen because Earth's axis is tilted. As Earth orbits the sun, each hemisphere takes turns "
      "leaning toward it and getting more direct sunlight.",
      ("Earth's axis is tilted about 23 degrees.", "The tilt points the same way all year.",
       "The hemisphere leaning toward the sun has summer.", "Distance from the sun is not the main cause."),
      "tilted"),
    T("science", "Explain what gravity is in simple terms.",
      "Gravity is the pull that objects with mass have on each other. It keeps us on the ground and holds "
      "the moon in orbit around Earth.",
      ("Everything with mass attracts other mass.", "Bigger masses pull more strongly.",
       "The pull weakens with distance.", "It keeps the planets in orbit around the sun."),
      "mass"),
    T("science", "How does sound travel?",
      "Sound travels as vibrations passed from particle to particle through air, water or solids. It moves "
      "faster in solids than in air and cannot cross empty space.",
      ("Sound starts with a vibrating object.", "The vibrations pass through particles.",
       "It travels faster in water and solids than in air.", "It cannot travel through a vacuum."),
      "vibrations"),
    T("science", "What is the difference between weather and climate?",
      "Weather is the state of the air on a given day, like rain or sunshine. Climate is the average "
      "pattern of weather in a place over many years.",
      ("Weather changes from hour to hour.", "Climate describes long-term patterns.",
       "Climate is measured over decades.", "One cold day does not change the climate."),
      "average"),
    T("science", "Explain why ice floats on water.",
      "Ice floats because it is less dense than liquid water. When water freezes, its molecules lock into "
      "an open pattern that takes up more space.",
      ("Water expands when it freezes.", "Ice is about nine percent less dense than water.",
       "Less dense things float on denser liquids.", "Floating ice insulates lakes in winter."),
      "dense"),
    # ---- cooking
    T("cooking", "How do I cook rice on the stove?",
      "Rinse one cup of rice, add two cups of water, and bring it to a boil. Cover, simmer on low for "
      "eighteen minutes, then let it rest for five minutes.",
      ("Rinse the rice until the water runs clear.", "Use about two cups of water per cup of rice.",
       "Cover and simmer on low for eighteen minutes.", "Let it rest five minutes before fluffing."),
      "simmer"),
    T("cooking", "Give me tips for making a good omelette.",
      "Beat the eggs well, melt some butter in a nonstick pan over medium heat, and stir gently until just "
      "set. Add fillings, fold, and serve right away.",
      ("Beat two or three eggs with a pinch of salt.", "Use a nonstick pan and a little butter.",
       "Cook over medium heat, stirring gently.", "Add fillings, then fold before it browns."),
      "butter"),
    T("cooking", "Why should you rest meat after cooking it?",
      "Resting lets the juices settle back into the meat instead of running out when you cut it, so it "
      "stays moist. Five to ten minutes is usually enough.",
      ("Heat pushes the juices toward the center.", "Resting lets them spread back out.",
       "The meat stays moist when you slice it.", "Five to ten minutes is usually enough."),
      "juices"),
    T("cooking", "How can I keep fresh herbs longer?",
      "Trim the stems and stand soft herbs like basil in a glass of water. Wrap hardy herbs like rosemary "
      "in a damp paper towel and keep them in the fridge.",
      ("Trim the ends of the stems first.", "Keep soft herbs in a glass of water.",
       "Wrap hardy herbs in a damp paper towel.", "Store hardy herbs in the fridge."),
      "damp"),
    T("cooking", "What is the difference between baking soda and baking powder?",
      "Baking soda is pure sodium bicarbonate and needs an acid, like yogurt or lemon, to make dough rise. "
      "Baking powder already contains its own acid.",
      ("Baking soda needs an acidic ingredient.", "Baking powder includes its own acid.",
       "Both release gas that makes dough rise.", "Baking soda is about four times stronger."),
      "acid"),
    T("cooking", "Suggest a simple, healthy breakfast.",
      "Try oatmeal topped with sliced banana, a handful of nuts and a spoonful of yogurt. It is quick, "
      "filling and gives you fiber and protein.",
      ("Cook a bowl of oatmeal.", "Top it with sliced banana.",
       "Add a handful of nuts for protein.", "Finish with a spoonful of yogurt."),
      "fiber"),
    # ---- travel
    T("travel", "What should I pack for a weekend trip?",
      "Pack two changes of clothes, comfortable shoes, a toothbrush and toiletries, your phone charger, "
      "any medicine you take, and your ID or tickets.",
      ("Two changes of clothes and comfortable shoes.", "A toothbrush and small toiletries.",
       "Your phone charger and any medicine.", "Your ID, tickets and bookings."),
      "charger"),
    T("travel", "How can I beat jet lag?",
      "Switch to the local schedule as soon as you arrive, get outdoor light in the morning, drink plenty "
      "of water, and avoid long naps during the day.",
      ("Switch to local time as soon as you arrive.", "Get outdoor light in the morning.",
       "Drink plenty of water on the flight.", "Avoid long naps during the day."),
      "schedule"),
    T("travel", "Give me tips for saving money when traveling.",
      "Book flights early, travel outside peak season, stay somewhere with a kitchen, use public transport, "
      "and eat where the locals eat.",
      ("Book flights early.", "Travel outside peak season.",
       "Stay somewhere with a kitchen.", "Use public transport instead of taxis."),
      "season"),
    T("travel", "What should I do if I lose my passport abroad?",
      "Report the loss to the local police, then contact your country's embassy or consulate. Bring a "
      "photo, proof of identity and the police report to get an emergency travel document.",
      ("Report the loss to the local police.", "Contact your embassy or consulate.",
       "Bring a photo and proof of identity.", "Ask for an emergency travel document."),
      "embassy"),
    T("travel", "How do I stay safe when hiking alone?",
      "Tell someone your route and return time, carry water, a map and a charged phone, check the weather, "
      "and turn back if conditions get worse.",
      ("Tell someone your route and return time.", "Carry water, a map and a charged phone.",
       "Check the weather before you leave.", "Turn back if conditions get worse."),
      "route"),
    # ---- health
    T("health", "Why is sleep important?",
      "Sleep lets the body repair itself and helps the brain store memories. Most adults need seven to "
      "nine hours a night to stay alert and healthy.",
      ("The body repairs itself during sleep.", "The brain stores memories while you sleep.",
       "Good sleep keeps you alert.", "Most adults need seven to nine hours."),
      "memories"),
    T("health", "How much water should I drink each day?",
      "Most adults do well with about eight cups of fluid a day, and more when it is hot or when you "
      "exercise. Pale yellow urine means you are drinking enough.",
      ("Aim for about eight cups of fluid a day.", "Drink more in hot weather.",
       "Drink more when you exercise.", "Pale yellow urine is a good sign."),
      "exercise"),
    T("health", "Give me tips for reducing stress.",
      "Take short walks, breathe slowly for a few minutes, keep a regular sleep routine, talk to someone "
      "you trust, and break big tasks into small steps.",
      ("Take a short walk outside.", "Breathe slowly for a few minutes.",
       "Keep a regular sleep routine.", "Talk to someone you trust."),
      "breathe"),
    T("health", "Why is stretching good for you?",
      "Stretching keeps muscles flexible, improves your range of motion and eases stiffness from sitting. "
      "Gentle stretches after exercise also help you cool down.",
      ("It keeps muscles flexible.", "It improves your range of motion.",
       "It eases stiffness from sitting.", "It helps you cool down after exercise."),
      "flexible"),
    T("health", "How can I protect my skin from the sun?",
      "Wear sunscreen with a high protection factor, reapply it every two hours, put on a hat and "
      "sunglasses, and stay in the shade around midday.",
      ("Wear sunscreen with a high protection factor.", "Reapply it every two hours.",
       "Put on a hat and sunglasses.", "Stay in the shade around midday."),
      "sunscreen"),
    T("health", "When should I wash my hands, and how?",
      "Wash your hands before eating, after using the toilet, and after coughing or sneezing. Scrub with "
      "soap and water for at least twenty seconds.",
      ("Wash before eating or cooking.", "Wash after using the toilet.",
       "Wash after coughing or sneezing.", "Scrub with soap for twenty seconds."),
      "soap"),
    # ---- money
    T("money", "What is a budget and why should I make one?",
      "A budget is a plan for how you will spend and save your income each month. It shows where your "
      "money goes and helps you avoid debt.",
      ("A budget plans your spending and saving.", "It shows where your money goes.",
       "It helps you avoid debt.", "It makes saving for goals easier."),
      "income"),
    T("money", "Explain compound interest simply.",
      "Compound interest means you earn interest on your savings and also on the interest already added. "
      "Over many years, this makes savings grow faster and faster.",
      ("You earn interest on your savings.", "You also earn interest on past interest.",
       "Growth speeds up over time.", "Starting early makes a big difference."),
      "savings"),
    T("money", "How do I build an emergency fund?",
      "Set a goal of three to six months of expenses, open a separate savings account, and transfer a "
      "fixed amount automatically every payday.",
      ("Aim for three to six months of expenses.", "Keep it in a separate savings account.",
       "Transfer money automatically every payday.", "Only use it for real emergencies."),
      "automatically"),
    T("money", "What is the difference between a debit card and a credit card?",
      "A debit card spends money straight from your bank account. A credit card borrows money that you "
      "must repay later, often with interest if you do not pay in full.",
      ("A debit card uses money you already have.", "A credit card borrows money from the bank.",
       "Credit card balances must be repaid.", "Unpaid credit balances usually charge interest."),
      "borrows"),
    T("money", "Give me tips for cutting grocery costs.",
      "Plan your meals for the week, shop with a list, buy store brands, choose seasonal produce, and avoid "
      "shopping when you are hungry.",
      ("Plan your meals for the week.", "Shop with a list and stick to it.",
       "Buy store brands.", "Never shop when you are hungry."),
      "list"),
    # ---- writing
    T("writing", "How can I write a clear email?",
      "Use a specific subject line, put your main point in the first sentence, keep paragraphs short, and "
      "end with a clear request or next step.",
      ("Write a specific subject line.", "Put the main point first.",
       "Keep paragraphs short.", "End with a clear request."),
      "subject"),
    T("writing", "Give me tips for overcoming writer's block.",
      "Write badly on purpose for ten minutes, change your location, start with the easiest section, or "
      "talk through your idea out loud before writing it down.",
      ("Write freely for ten minutes without judging.", "Change your location.",
       "Start with the easiest section.", "Talk through your idea out loud."),
      "location"),
    T("writing", "What makes a good opening sentence for a story?",
      "A good opening sentence raises a question, hints at conflict, or drops the reader straight into "
      "action, so they want to keep reading.",
      ("It raises a question in the reader's mind.", "It hints at conflict.",
       "It starts in the middle of the action.", "It makes the reader want more."),
      "conflict"),
    T("writing", "Explain the difference between 'their', 'there' and 'they're'.",
      "'Their' shows ownership, 'there' points to a place, and 'they're' is short for 'they are', as in: "
      "they're parking their car over there.",
      ("'Their' shows ownership, as in their house.", "'There' points to a place, as in over there.",
       "'They're' is short for 'they are'.", "Test it by saying 'they are' instead."),
      "ownership"),
    T("writing", "How do I write a good thank-you note?",
      "Thank the person for something specific, say how it helped you or made you feel, and close with a "
      "warm wish. Three or four sentences are enough.",
      ("Thank them for something specific.", "Say how it helped or made you feel.",
       "Close with a warm wish.", "Keep it to a few sentences."),
      "specific"),
    # ---- computing
    T("computing", "What is a password manager?",
      "A password manager is an app that keeps your passwords in an encrypted vault, so you only need to "
      "remember one master password. It can also create strong, unique passwords.",
      ("It stores passwords in an encrypted vault.", "You remember only one master password.",
       "It creates strong, unique passwords.", "It can fill in logins for you."),
      "encrypted"),
    T("computing", "Explain what the cloud means in computing.",
      "The cloud means using computers in remote data centers over the internet to store files or run "
      "programs, instead of relying only on your own device.",
      ("The cloud is made of remote data centers.", "You reach it over the internet.",
       "It can store files or run programs.", "Your data is available from any device."),
      "internet"),
    T("computing", "How can I speed up a slow laptop?",
      "Close programs you are not using, remove apps that launch at startup, free up disk space, install "
      "updates, and restart the laptop regularly.",
      ("Close programs you are not using.", "Remove apps that launch at startup.",
       "Free up disk space.", "Restart the laptop regularly."),
      "restart"),
    T("computing", "What is the difference between memory and storage in a computer?",
      "Memory holds the data your computer is using right now and is cleared when it turns off. Storage, "
      "such as a hard drive, keeps your files even when the power is off.",
      ("Memory holds what is in use right now.", "Memory is cleared when the computer turns off.",
       "Storage keeps files when the power is off.", "Memory is much faster than storage."),
      "power"),
    T("computing", "How do I spot a phishing email?",
      "Watch for urgent demands, unexpected links or attachments, spelling mistakes, and sender addresses "
      "that do not match the company. When in doubt, contact the company directly.",
      ("Be wary of urgent demands.", "Do not open unexpected links or attachments.",
       "Look for spelling mistakes.", "Check that the sender address matches the company."),
      "urgent"),
    T("computing", "Why should I back up my files?",
      "Backups protect your files if a device breaks, is stolen or is hit by malware. Keep at least one "
      "copy on an external drive and one in the cloud.",
      ("Devices can break or be stolen.", "Malware can lock or delete files.",
       "Keep one copy on an external drive.", "Keep another copy in the cloud."),
      "malware"),
    # ---- nature
    T("nature", "Why do leaves change color in autumn?",
      "In autumn, trees stop making green chlorophyll, so the yellow and orange pigments hidden in the "
      "leaves show through. Some trees also make new red pigments.",
      ("Trees stop making green chlorophyll.", "Hidden yellow and orange pigments show through.",
       "Some trees make new red pigments.", "Shorter, cooler days trigger the change."),
      "chlorophyll"),
    T("nature", "How do bees make honey?",
      "Bees collect nectar from flowers, add enzymes, and store it in wax cells. They fan it with their "
      "wings until enough water evaporates to turn it into honey.",
      ("Bees collect nectar from flowers.", "They add enzymes to the nectar.",
       "They store it in wax cells.", "Fanning wings evaporate the extra water."),
      "nectar"),
    T("nature", "Why do birds migrate?",
      "Many birds migrate to follow food and good weather. They fly to warmer places for the winter and "
      "return in spring to breed where food is plentiful.",
      ("Birds follow seasonal food supplies.", "They escape cold winters.",
       "They return in spring to breed.", "Some travel thousands of miles each year."),
      "breed"),
    T("nature", "What is a coral reef?",
      "A coral reef is an underwater structure built over centuries by tiny animals called coral polyps. "
      "Reefs shelter about a quarter of all sea species.",
      ("Reefs are built by tiny coral polyps.", "They grow slowly over centuries.",
       "They shelter about a quarter of sea species.", "Warming water can bleach and kill them."),
      "polyps"),
    T("nature", "How do volcanoes form?",
      "Volcanoes form where melted rock, called magma, rises through cracks in Earth's crust. Each "
      "eruption piles up lava and ash, building a mountain over time.",
      ("Magma rises through cracks in the crust.", "It erupts as lava and ash.",
       "Layers pile up with each eruption.", "Many volcanoes sit where tectonic plates meet."),
      "magma"),
    T("nature", "Why are forests important?",
      "Forests absorb carbon dioxide, release oxygen, shelter countless animals, protect soil from erosion, "
      "and supply wood, food and clean water.",
      ("They absorb carbon dioxide.", "They are home to countless animals.",
       "Their roots protect soil from erosion.", "They supply wood, food and clean water."),
      "erosion"),
    # ---- history
    T("history", "Who built the pyramids of Giza?",
      "The pyramids of Giza were built by ancient Egyptian workers about 4,500 years ago as tombs for "
      "pharaohs. The builders were paid laborers, not slaves.",
      ("They were built about 4,500 years ago.", "They served as tombs for pharaohs.",
       "Paid Egyptian laborers built them.", "The largest is the Great Pyramid of Khufu."),
      "tombs"),
    T("history", "What was the printing press and why did it matter?",
      "The printing press, developed by Johannes Gutenberg around 1440, used movable metal type to print "
      "pages quickly. It made books cheaper and spread ideas across Europe.",
      ("Gutenberg developed it around 1440.", "It used movable metal type.",
       "Books became much cheaper.", "Ideas spread quickly across Europe."),
      "movable"),
    T("history", "Why did the Romans build so many roads?",
      "The Romans built roads to move armies quickly, carry trade goods, and connect their empire. Many "
      "were so well made that parts still exist today.",
      ("Roads let armies move quickly.", "They carried trade goods across the empire.",
       "They tied distant provinces to Rome.", "Parts of some roads still exist today."),
      "armies"),
    T("history", "What was the Industrial Revolution?",
      "The Industrial Revolution was the shift, starting in Britain in the late 1700s, from making goods "
      "by hand to using machines and factories powered by water and steam.",
      ("It began in Britain in the late 1700s.", "Machines replaced much hand production.",
       "Factories were powered by water and steam.", "Many people moved from farms to cities."),
      "steam"),
    T("history", "Why was the first Moon landing important?",
      "In 1969, Apollo 11 landed the first people on the Moon. It proved humans could reach another world "
      "and inspired generations of scientists and engineers.",
      ("Apollo 11 landed on the Moon in 1969.", "It was the first time people walked on another world.",
       "It showed what science and teamwork could do.", "It inspired generations of engineers."),
      "inspired"),
    # ---- home and everyday life
    T("home", "How do I remove a coffee stain from a shirt?",
      "Blot the stain right away, rinse it from the back with cold water, rub in a little liquid detergent, "
      "and wash as usual. Avoid hot water until it is gone.",
      ("Blot the stain right away.", "Rinse it from the back with cold water.",
       "Rub in a little liquid detergent.", "Avoid hot water until it is gone."),
      "detergent"),
    T("home", "How can I keep houseplants healthy?",
      "Give them the right amount of light, water only when the top of the soil is dry, use pots with "
      "drainage holes, and wipe dust off the leaves.",
      ("Give them the right amount of light.", "Water only when the topsoil is dry.",
       "Use pots with drainage holes.", "Wipe dust off the leaves."),
      "drainage"),
    T("home", "Give me tips for a productive morning.",
      "Wake up at the same time each day, drink a glass of water, plan your top three tasks, and start with "
      "the hardest one before checking messages.",
      ("Wake up at the same time each day.", "Drink a glass of water.",
       "Plan your top three tasks.", "Do the hardest task before checking messages."),
      "tasks"),
    # ---- tasks with an input text
    T("office", "Summarize the following note.",
      "The office is closed on Friday for electrical repairs. Shut down your computer before leaving on "
      "Thursday; it reopens Monday at 8 a.m. with free coffee.",
      ("The office is closed Friday for electrical repairs.", "Shut down computers before leaving Thursday.",
       "It reopens Monday at 8 a.m.", "Free coffee will be provided."),
      "repairs",
      input="Hi team, the office will be closed on Friday while electricians carry out repairs. Please save "
            "your work and shut down your computers before you leave on Thursday. The building reopens on "
            "Monday at 8 a.m., and there will be free coffee to make up for the trouble."),
    T("reviews", "Classify the sentiment of this review as positive, negative or mixed, and explain briefly.",
      "Mixed. The reviewer praises the spotless room and friendly staff but complains that street noise "
      "kept them awake.",
      ("Sentiment: mixed.", "Positive: the room was spotless.",
       "Positive: the staff were friendly.", "Negative: street noise kept them awake."),
      "noise",
      input="The room was spotless and the staff could not have been nicer, but the traffic outside kept us "
            "awake every single night."),
    T("writing", "Rewrite this message so that it sounds polite.",
      "Could you please send me the report when you get a chance? I need it soon for my work, so I would "
      "really appreciate it.",
      ("Could you please send me the report?", "I need it soon for my work.", "Thank you for your help."),
      "please",
      input="Send me the report now. It's late and I need it.", omit="bullets"),
    T("nature", "Summarize this paragraph.",
      "Octopuses are very intelligent: they open jars, escape tanks and recognize people. Their eight arms "
      "are full of neurons and can react on their own.",
      ("Octopuses are very intelligent.", "They open jars and escape tanks.",
       "They recognize individual people.", "Their arms can react on their own."),
      "neurons",
      input="Octopuses are remarkably clever animals. They can unscrew jars, slip out of their tanks and "
            "tell individual people apart. Each of their eight arms holds a large share of their nerve cells, "
            "so an arm can respond to touch and taste with little direction from the brain."),
    T("office", "List the key dates in this text.",
      "The renovation starts on March 3, the children's section reopens on April 14, and the grand "
      "reopening is on May 20.",
      ("March 3: the renovation starts.", "April 14: the children's section reopens.",
       "May 20: the grand reopening."),
      "reopening",
      input="Work on the library begins on March 3. Families can use the children's section again from "
            "April 14, and the whole building celebrates its grand reopening on May 20."),
    T("reasoning", "Is the following sentence a fact or an opinion? Explain briefly.",
      "It is an opinion. Beauty is a personal judgment, so people can disagree; a fact, such as Paris being "
      "the capital of France, can be checked.",
      ("It is an opinion.", "Beauty is a personal judgment.",
       "People can reasonably disagree about it.", "A fact could be checked."),
      "judgment",
      input="Paris is the most beautiful city in the world."),
    T("reviews", "Summarize this customer complaint.",
      "The customer received a red kettle instead of the blue one they ordered, got no reply to two emails, "
      "and wants the right kettle or a refund.",
      ("They received the wrong color kettle.", "Two emails to support went unanswered.",
       "They want the right kettle or a refund."),
      "refund",
      input="I ordered a blue kettle two weeks ago and a red one arrived. I have emailed your support team "
            "twice and heard nothing back. Please send the kettle I ordered or give me my money back."),
    T("health", "Give me tips for eating more vegetables.",
      "Add a handful of greens to soups and pasta, keep cut vegetables in the fridge for snacks, and fill "
      "half your plate with vegetables at dinner.",
      ("Stir greens into soups and pasta.", "Keep cut vegetables ready for snacks.",
       "Fill half your plate with vegetables.", "Try one new vegetable each week."),
      "snacks"),
]


def _word_limit(text: str) -> int:
    wc = count_words(text)
    for n in WORD_LIMITS:
        if n >= wc:
            return n
    raise ValueError(f"answer too long for a word limit ({wc} words): {text!r}")


def split_of(i: int) -> str:
    """Topic ``i``'s split. Whole topics are held out, so a validation or test prompt never shares
    its task text with a training prompt: every fifth topic is a test topic, every tenth of the
    rest a validation topic."""
    if i % 5 == 4:
        return "test"
    return "validation" if i % 10 == 2 else "train"


def _record(i: int, topic: Topic, ctype: str, held_out_phrasing: bool = False) -> dict:
    ans = topic.answer
    if ctype == "max_words":
        constraint, output = {"type": ctype, "n": _word_limit(ans)}, ans
    elif ctype == "lowercase":
        constraint, output = {"type": ctype}, ans.lower()
    elif ctype == "bullets":
        n = min(BULLET_COUNTS[i % len(BULLET_COUNTS)], len(topic.facts))
        constraint, output = {"type": ctype, "n": n}, "\n".join("- " + f for f in topic.facts[:n])
    elif ctype == "starts_with":
        phrase = START_PHRASES[i % len(START_PHRASES)]
        constraint, output = {"type": ctype, "phrase": phrase}, f"{phrase} {ans}"
    elif ctype == "ends_with":
        phrase = END_PHRASES[i % len(END_PHRASES)]
        constraint, output = {"type": ctype, "phrase": phrase}, f"{ans} {phrase}"
    elif ctype == "include_keyword":
        constraint, output = {"type": ctype, "keyword": topic.keyword}, ans
    else:
        raise ValueError(ctype)
    variant = (i + TYPES.index(ctype)) % 3
    instruction = f"{topic.task} {describe_constraint(constraint, variant, held_out=held_out_phrasing)}"
    return {"instruction": instruction, "input": topic.input, "output": output, "constraint": constraint,
            "split": split_of(i), "slice": "heldout_phrasing" if held_out_phrasing else "demo_phrasing"}


def build_records() -> list[dict]:
    """All demo records, in a fixed order, each checked against its own constraint: every topic
    with every constraint type in the demo's phrasings, and each test topic once more in the
    phrasings that only test prompts use (``slice: heldout_phrasing``)."""
    records = []
    for i, topic in enumerate(TOPICS):
        kw = topic.keyword.lower()
        if kw in topic.task.lower() or kw not in topic.answer.lower():
            raise ValueError(f"topic {i}: keyword {topic.keyword!r} must be in the answer and not in the task")
        phrasings = (False, True) if split_of(i) == "test" else (False,)
        for held_out in phrasings:
            for ctype in TYPES:
                if ctype == topic.omit:
                    continue
                rec = _record(i, topic, ctype, held_out)
                if not passes(rec["output"], rec["constraint"]):
                    raise ValueError(f"topic {i} ({ctype}): reference output fails its constraint: {rec['output']!r}")
                if find_constraint(rec["instruction"]) != rec["constraint"]:
                    raise ValueError(f"topic {i} ({ctype}): constraint not recoverable from {rec['instruction']!r}")
                records.append(rec)
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_PATH, help="where to write the JSONL (default: next to this file)")
    ap.add_argument("--check", action="store_true", help="only check that --out is up to date")
    args = ap.parse_args(argv)
    text = render(build_records())
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} is out of date; run python -m alignkit.demo.make_demo", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({text.count(chr(10))} records)")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
